"""A frozen decoder-only language model (the base model of a causal-LM family: LlamaModel, Qwen2Model,
GPT2Model, ...) run to per-layer states, with its tokenizer.

The stored states are what each block hands the next: layer 0 is the input of block 0 (the embedding output,
with whatever the family adds before its blocks: GPT-2's learned positions, Gemma's sqrt(d) scale), layer i
the output of block i-1, all taken by hooks on the blocks. transformers' last `hidden_states` entry has the
final norm applied; the store's has not (as for T5, docs/design.md section 1). Asking for layers <= k runs
blocks 0..k-1 only (the hook on block k-1 stops the forward). Right padding never touches a real token's
states: the mask is causal, so a padded batch gives each row what it gives alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import BackboneError, expected
from ...text.backbone import Backbone, load_backbone


def is_causal_lm(config) -> bool:
    """A decoder-only causal-LM family: transformers has a *ForCausalLM class for it, no masked-LM class (BERT and
    its kin have both), and it is not encoder-decoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    return (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not getattr(config, "is_encoder_decoder", False)
            and hasattr(config, "num_hidden_layers") and hasattr(config, "hidden_size"))


def decoder_blocks(model: nn.Module, n: int) -> nn.ModuleList:
    """The stack of decoder blocks inside a transformers base model, found by shape (Llama's `layers`, GPT-2's
    `h`, ...), not by name."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise BackboneError(f"Could not find the {n} decoder blocks inside {type(model).__name__}; "
                        "this causal-LM family is not supported by the decoder kind.")


class _Stop(Exception):
    """Raised by the hook of the last block needed: the rest of the forward is not computed."""


@dataclass
class CausalBackbone(Backbone):
    """A `Backbone` whose states are taken at the blocks (pre-final-norm), for causal models."""

    @property
    def blocks(self) -> nn.ModuleList:
        return decoder_blocks(self.model, self.num_layers)

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None, layers: list[int]) -> torch.Tensor:
        """States of `layers` (0 = embedding output, i = output of block i-1): (B, T, n_layers, d) float32."""
        blocks, last = self.blocks, max(layers)
        taken: dict[int, torch.Tensor] = {}

        def first_input(module, args, kwargs):
            taken[0] = args[0] if args else kwargs["hidden_states"]
            if last == 0:
                raise _Stop

        def output(i: int, module, args, out):
            taken[i + 1] = out[0] if isinstance(out, tuple) else out
            if i + 1 == last:
                raise _Stop

        handles = [blocks[0].register_forward_pre_hook(first_input, with_kwargs=True)]
        handles += [blocks[i].register_forward_hook(lambda m, a, o, i=i: output(i, m, a, o)) for i in range(last)]
        try:
            self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                       use_cache=False, return_dict=True)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return torch.stack([taken[i] for i in layers], dim=2).float()


def load_causal_backbone(name_or_path: str, precision: str = "fp32", device: str = "auto") -> CausalBackbone:
    """The frozen base model of a causal LM in eval mode (a *ForCausalLM checkpoint loads without its head)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the LM head as unexpected: it is, and unused here
    try:
        bb = load_backbone(name_or_path, precision, device)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not is_causal_lm(bb.config):
        raise BackboneError(expected("a decoder-only causal language model (a family with a *ForCausalLM class)",
                                     f"'{name_or_path}' ({type(bb.config).__name__})"))
    return CausalBackbone(bb.model, bb.tokenizer, bb.name, bb.revision, bb.precision, bb.device)
