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
from pathlib import Path

import torch
from torch import nn

from ...errors import BackboneError, expected
from ...loading import TORCH_DTYPES, check_model_path, first_line, resolve_device, weights_hash
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


def cache_argument(model: nn.Module, cache) -> dict:
    """The keyword a transformers model takes its KV cache by (`cache` from transformers 5.x, `past_key_values`
    before), or nothing when there is none."""
    if cache is None:
        return {}
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


class _Stop(Exception):
    """Raised by the hook of the last block needed: the rest of the forward is not computed."""


@dataclass
class CausalBackbone(Backbone):
    """A `Backbone` whose states are taken at the blocks (pre-final-norm), for causal models. `lm`: the whole
    *ForCausalLM (its LM head and final norm) where one was loaded (`load_causal_lm`), else None."""

    lm: nn.Module | None = None

    @property
    def blocks(self) -> nn.ModuleList:
        return decoder_blocks(self.model, self.num_layers)

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None, layers: list[int]) -> torch.Tensor:
        """States of `layers` (0 = embedding output, i = output of block i-1): (B, T, n_layers, d) float32."""
        return self.run_blocks(layers, input_ids=input_ids.to(self.device),
                               attention_mask=attention_mask.to(self.device), use_cache=False)

    def new_cache(self):
        """An empty KV cache of the backbone's own family (sliding layers kept as the family keeps them)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, cache, layers: list[int]) -> torch.Tensor:
        """Generation: the states of `layers` at the new tokens (1, t, n_layers, d) float32, one unpadded row,
        attending to what `cache` (from `new_cache`, filled by earlier steps) holds. Blocks past the last
        stored layer are not run, so their part of the cache stays empty: nothing reads it."""
        return self.run_blocks(layers, input_ids=input_ids.to(self.device), use_cache=True,
                               **cache_argument(self.model, cache))

    def run_blocks(self, layers: list[int], **inputs) -> torch.Tensor:
        """The base model on `inputs`, stopped after the last block `layers` needs; the states of `layers`."""
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
            self.model(**inputs, return_dict=True)
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


def load_causal_lm(name_or_path: str, precision: str = "fp32", device: str = "auto") -> CausalBackbone:
    """The frozen causal LM with its LM head (targets through the head, generation): `model` is its base model,
    `lm` the whole *ForCausalLM. A checkpoint whose LM head is missing (a saved base model with untied
    embeddings) is refused: a random head would make every target meaningless."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if precision not in TORCH_DTYPES:
        raise BackboneError(expected(f"--precision one of {sorted(TORCH_DTYPES)} for targets through the LM head",
                                     precision, "int8 compute is built for classification stores only."))
    check_model_path(name_or_path)
    dev = resolve_device(device)
    local = Path(name_or_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the missing head is reported below in one line, not as a load report
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        lm, info = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=TORCH_DTYPES[precision],
                                                        output_loading_info=True)
    except (OSError, ValueError) as err:
        raise BackboneError(f"Could not load backbone '{name_or_path}': {first_line(err)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    head = lm.get_output_embeddings()
    head_names = {n for n, p in lm.named_parameters() if any(p is q for q in head.parameters())} if head else set()
    missing = sorted(set(info.get("missing_keys") or ()) & head_names)
    if head is None or missing:
        raise BackboneError(expected("a causal LM checkpoint with its LM head (targets are scored through it)",
                                     f"'{name_or_path}' without {', '.join(missing) or 'an output layer'}",
                                     "Use the *ForCausalLM checkpoint, not a saved base model."))
    if not is_causal_lm(lm.config):
        raise BackboneError(expected("a decoder-only causal language model (a family with a *ForCausalLM class)",
                                     f"'{name_or_path}' ({type(lm.config).__name__})"))
    lm.eval().requires_grad_(False).to(dev)
    revision = weights_hash(local) if local.is_dir() else str(getattr(lm.config, "_commit_hash", None) or "unknown")
    return CausalBackbone(lm.base_model, tokenizer, str(local.resolve()) if local.exists() else name_or_path,
                          revision, precision, dev, lm=lm)
