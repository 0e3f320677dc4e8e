"""The text-encoder kind of stage 2 (BERT-family backbones): side network (model.py), its recipe for the
shared training loop (recipe.py), pruned init (prune.py), prediction on raw text (predict.py); kind.py
plugs them in."""

from .kind import EncoderTrainKind

TRAIN_KIND = EncoderTrainKind()  # named in the kind's registration (featcache/kinds/encoder/__init__.py)
