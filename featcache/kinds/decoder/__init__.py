"""The decoder-only kind of store (causal language models: Llama, Qwen2, Mistral, GPT-2, ...).
Stage 2: sidetrain/kinds/decoder/."""

from ..registry import register_kind
from .kind import DecoderExtractKind

register_kind(DecoderExtractKind(), train="sidetrain.kinds.decoder:TRAIN_KIND")
