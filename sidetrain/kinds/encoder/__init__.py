"""The text-encoder kind of stage 2 (BERT-family backbones): side network (model.py), its recipe for the
shared training loop (recipe.py), pruned init (prune.py), prediction on raw text (predict.py); kind.py
plugs them in."""

from ..registry import register_kind
from .kind import EncoderKind

register_kind("encoder", EncoderKind())
