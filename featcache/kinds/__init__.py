"""Kinds of store, each a plug-in over the shared writer (featcache/writer.py) and reader.

    encoder   text encoders (BERT-family): per-layer states of each example's tokens   (encoder.py)
    seq2seq   T5: encoder states + decoder states teacher-forced on label texts       (seq2seq.py)
    image     vision backbones: per-layer patch tokens, or a CNN's pooled stage maps   (image.py)
    vision_language   a text part per row + an image part, one row per distinct image (vision_language.py)

A kind registers itself by name (registry.py says what it brings); the manifest records the name,
and stage 2 looks its own plug-in up by the same name. Adding a kind: one module here, imported
below, and its stage-2 package under sidetrain/kinds/.
"""

from . import encoder, image, seq2seq, vision_language  # noqa: F401 - importing a kind registers it
from .registry import (
    ROOT,
    KindPlan,
    PartPlan,
    RowsFn,
    StoreKind,
    get_kind,
    kind_claiming_name,
    kind_for_request,
    kind_of,
    register_kind,
    registered_kinds,
)

__all__ = ["ROOT", "KindPlan", "PartPlan", "RowsFn", "StoreKind", "get_kind", "kind_claiming_name", "kind_for_request", "kind_of",
           "register_kind", "registered_kinds"]
