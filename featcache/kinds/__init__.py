"""Kinds of store, one folder each; every kind is a plug-in over the shared writer (featcache/writer.py) and
reader, registered once with both of its halves (registry.py):

    encoder           text encoders (BERT-family): per-layer states of each example's tokens
    decoder           decoder-only causal LMs (Llama, Qwen2, Mistral, GPT-2): per-layer states of each token
    seq2seq           T5: encoder states + decoder states teacher-forced on label texts
    image             vision backbones: per-layer patch tokens, or a CNN's pooled stage maps
    vision_language   a text part per row + an image part, one row per distinct image

The manifest records the kind's name; stage 2 finds the kind's train half under the same name
(sidetrain/kinds/<name>/). Parts that several kinds share live in featcache/text/ and featcache/images/.
Adding a kind: a folder here whose __init__ calls `register_kind`, imported below, and its stage-2
folder under sidetrain/kinds/. Detection follows each kind's `precedence`, not this import order.
"""

from . import decoder, encoder, image, seq2seq, vision_language  # noqa: F401 - importing a kind registers it
from .registry import (
    ExtractKind,
    KindEntry,
    get_kind,
    kind_claiming_name,
    kind_entry,
    kind_for_manifest,
    kind_for_request,
    register_kind,
    registered_kinds,
)

__all__ = ["ExtractKind", "KindEntry", "get_kind", "kind_claiming_name", "kind_entry", "kind_for_manifest",
           "kind_for_request", "register_kind", "registered_kinds"]
