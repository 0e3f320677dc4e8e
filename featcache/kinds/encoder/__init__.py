"""The text-encoder kind of store (BERT-family backbones). Stage 2: sidetrain/kinds/encoder/."""

from ..registry import register_kind
from .kind import EncoderExtractKind

register_kind(EncoderExtractKind(), train="sidetrain.kinds.encoder:TRAIN_KIND")
