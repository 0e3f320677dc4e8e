"""Stage-2 plug-ins, one per kind of store (registry.py says what a kind brings).

Importing this package registers the built-in kinds; `kinds.registry` is imported through it, so a
lookup always sees them. A new kind: a subpackage here that calls `register_kind` in its `__init__`,
imported below (encoder, seq2seq, image, vision_language: text + image tokens).
"""

from . import encoder, image, seq2seq, vision_language  # noqa: F401 - importing a kind registers it
from .registry import SearchFacts, StoreKind, kind_for, kind_names, register_kind

__all__ = ["SearchFacts", "StoreKind", "kind_for", "kind_names", "register_kind"]
