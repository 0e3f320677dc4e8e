"""The train halves of the kinds of store, one folder each (encoder, seq2seq, image, vision_language: text +
image tokens). A kind is registered once, with both halves, in featcache/kinds/<name>/__init__.py; its folder
here exports `TRAIN_KIND`, a `TrainKind` (base.py). `kind_for(manifest)` (registry.py) finds it.
Side-network pieces that several kinds share live in sidetrain/networks/, recipe helpers in sidetrain/recipe.py.
"""

from .base import SearchFacts, TrainKind
from .registry import kind_for, kind_names

__all__ = ["SearchFacts", "TrainKind", "kind_for", "kind_names"]
