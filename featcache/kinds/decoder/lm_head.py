"""The frozen top of a causal LM, as plain arrays: its final norm and its LM head. A target store keeps them
(under `backbone_weights/`, as the T5 store keeps its LM head), so stage 2 maps a side network's outputs to
next-token logits without the backbone:

    logits = LMHead(FinalNorm(x))          FinalNorm: RMSNorm (Llama, Qwen2, Mistral, Gemma's 1 + w folded in)
                                           or LayerNorm (GPT-2); LMHead: (vocab, d), and a bias where it has one

Nothing here is written per family: `frozen_top` finds the final norm by what it does (the module outside the
blocks that maps the last block's output onto transformers' last hidden state), checks that these arrays give
the LM's own logits on a probe sequence, and refuses a family whose top does more (logit scaling or soft-capping).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import BackboneError, expected

NORM_WEIGHT, NORM_BIAS, NORM_EPS = "final_norm_weight", "final_norm_bias", "final_norm_eps"
HEAD, HEAD_BIAS = "lm_head", "lm_head_bias"
PROBE_TOKENS = 7  # the probe sequence: token ids 0..6 (every vocabulary has them)
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}  # relative error of the probe's logits


def final_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """(..., d) -> (..., d) float32: LayerNorm where the family's norm has a bias (centres), else RMSNorm."""
    x = x.float()
    if bias is not None:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def lm_logits(x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Pre-norm states (..., d) -> next-token logits (..., vocab) float32, through the arrays `frozen_top` gives."""
    normed = final_norm(x, weights[NORM_WEIGHT], weights.get(NORM_BIAS), float(weights[NORM_EPS].reshape(-1)[0]))
    return F.linear(normed.to(weights[HEAD].dtype), weights[HEAD], weights.get(HEAD_BIAS)).float()


def _norm_candidates(base: nn.Module, blocks: nn.ModuleList, d: int):
    """Modules outside the blocks with a (d,) weight: the final norm is one of them (found by what it does)."""
    inside = {id(m) for m in blocks.modules()}
    for module in base.modules():
        weight = getattr(module, "weight", None)
        if id(module) in inside or not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (d,):
            continue
        eps = next((float(v) for f in ("variance_epsilon", "eps", "epsilon")
                    if isinstance(v := getattr(module, f, None), (int, float))), None)
        if eps is None:
            continue
        w = weight.detach().float().cpu()
        bias = getattr(module, "bias", None)
        if isinstance(module, nn.LayerNorm) or isinstance(bias, torch.Tensor):
            b = bias.detach().float().cpu() if isinstance(bias, torch.Tensor) else torch.zeros(d)
            yield {NORM_WEIGHT: w, NORM_BIAS: b, NORM_EPS: torch.tensor([eps])}
        else:  # RMSNorm: w (Llama), or 1 + w (Gemma)
            yield {NORM_WEIGHT: w, NORM_EPS: torch.tensor([eps])}
            yield {NORM_WEIGHT: 1 + w, NORM_EPS: torch.tensor([eps])}


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    return bool((got - want).abs().max() <= tol * want.abs().max().clamp(min=1e-6))


@torch.no_grad()
def frozen_top(backbone) -> dict[str, np.ndarray]:
    """The final norm and LM head of a `load_causal_lm` backbone as float32 arrays, checked on a probe sequence:
    these arrays applied to the last block's output give the LM's own logits."""
    lm, base, d = backbone.lm, backbone.model, backbone.hidden_size
    tol = TOLERANCE.get(backbone.precision, 1e-4)
    ids = torch.arange(PROBE_TOKENS, device=backbone.device)[None] % max(1, int(lm.config.vocab_size))
    last = backbone.run_blocks([backbone.num_layers], input_ids=ids, use_cache=False)[0, :, 0]  # (T, d)
    out = lm(input_ids=ids, output_hidden_states=True, use_cache=False, return_dict=True)
    final, logits = out.hidden_states[-1][0].float().cpu(), out.logits[0].float().cpu()
    head = lm.get_output_embeddings()
    weights = {HEAD: head.weight.detach().float().cpu()}
    if isinstance(getattr(head, "bias", None), torch.Tensor):
        weights[HEAD_BIAS] = head.bias.detach().float().cpu()
    last = last.cpu()
    norm = next((c for c in _norm_candidates(base, backbone.blocks, d)
                 if _close(final_norm(last, c[NORM_WEIGHT], c.get(NORM_BIAS), float(c[NORM_EPS][0])), final, tol)),
                None)
    family = type(lm).__name__
    if norm is None:
        raise BackboneError(expected("a causal LM whose last hidden state is a LayerNorm or RMSNorm of its last "
                                     "block's output (the final norm stage 2 applies)", family,
                                     "Targets through the LM head are not supported for this family; "
                                     "classification stores are."))
    weights.update(norm)
    if not _close(lm_logits(last, weights), logits, tol):
        raise BackboneError(expected("a causal LM whose logits are its LM head applied to the final norm's output",
                                     f"{family}, whose top does more (logit scaling or soft-capping)",
                                     "Targets through the LM head are not supported for this family; "
                                     "classification stores are."))
    return {k: v.numpy() for k, v in weights.items()}
