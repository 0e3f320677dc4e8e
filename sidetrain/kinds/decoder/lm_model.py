"""The causal side network through the frozen LM head (targets: scored label texts, free text, generation).

    s_t = CausalSideStack(h)_t                                   # model.py: ladders + the family's blocks at d/r
    x_t = Up(dropout(s_t))                                       # d/r -> d
    --top last:   x_t = (1 - g) x_t + g h_last,t                  # QST's gate, g = sigmoid(z), z starts at 2
    --top layers: x_t = (1 - g) x_t + g sum_l softmax(v)_l h_l,t  # over every stored layer
    logits_t = LMHead(FinalNorm(x_t))                            # frozen: the backbone's own (lm_head.py)

At the position before target token u, logits predict token u; the loss is the cross-entropy of the target tokens
only. With the gate, a run starts near the backbone's own next-token distribution (h_last is its last stored
layer, pre-norm, as FinalNorm expects) and learns how much the side network changes it. Full-vocabulary logits
exist for at most CHUNK_TOKENS positions at a time (`target_log_probs`, `target_loss`, `target_argmax`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from featcache.kinds.decoder.lm_head import HEAD, HEAD_BIAS, NORM_BIAS, NORM_EPS, NORM_WEIGHT, final_norm

from ...networks.top import GATE_START
from .model import CausalSideStack

if TYPE_CHECKING:
    from ...networks.side_config import SideConfig

CHUNK_TOKENS = 1024  # target positions whose full-vocabulary logits exist at once: 1024 x 128k fp32 = 512 MiB


class FrozenTop(nn.Module):
    """The backbone's final norm and LM head, frozen (buffers, not saved with the side network: the store or
    the live backbone gives them)."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name in (NORM_WEIGHT, NORM_BIAS, HEAD, HEAD_BIAS):
            self.register_buffer(name, weights[name].float() if name in weights else None, persistent=False)
        self.eps = float(weights[NORM_EPS].reshape(-1)[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-norm states (..., d) -> logits (..., vocab) float32."""
        normed = final_norm(x, self.final_norm_weight, self.final_norm_bias, self.eps)
        return F.linear(normed.to(self.lm_head.dtype), self.lm_head, self.lm_head_bias).float()


class CausalLMSideNetwork(CausalSideStack):
    """`weights`: the frozen top's arrays (final norm, LM head) by the names lm_head.py gives them."""

    def __init__(self, backbone_config, side: SideConfig, weights: dict[str, torch.Tensor]) -> None:
        super().__init__(backbone_config, side)
        d, ds = int(backbone_config.hidden_size), int(self.config.hidden_size)
        self.up = nn.Linear(ds, d)
        self.dropout = nn.Dropout(side.dropout)
        self.top_mode = side.top
        if side.top != "side":
            self.gate = nn.Parameter(torch.tensor(GATE_START))
        if side.top == "layers":
            self.mix = nn.Parameter(torch.zeros(len(side.stored_layers)))  # equal weights at start
        self.frozen = FrozenTop(weights)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, at: torch.Tensor, cache=None) -> torch.Tensor:
        """hidden (N, T, n_stored, d), mask (N, T) bool, at (N, T) bool: the positions to read -> the gated
        pre-norm states there, (M, d) in row-major order of `at`. `cache`: as in `side_states`."""
        out = self.side_states(hidden, mask, cache)[at]  # (M, ds)
        x = self.up(self.dropout(out))
        if self.top_mode == "side":
            return x
        h = hidden[at]  # (M, n_stored, d)
        backbone = (torch.einsum("mld,l->md", h, torch.softmax(self.mix, 0).to(h.dtype))
                    if self.top_mode == "layers" else h[:, -1])
        g = torch.sigmoid(self.gate)
        return (1 - g) * x + g * backbone.to(x.dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., vocab): for a few positions only (generation); training uses `target_loss`."""
        return self.frozen(x)


def target_log_probs(x: torch.Tensor, top: nn.Module, targets: torch.Tensor, chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """log p(targets[m]) at every read position (M,), `chunk` positions' logits at a time."""
    parts = [torch.log_softmax(top(x[lo:lo + chunk]), -1).gather(-1, targets[lo:lo + chunk, None]).squeeze(-1)
             for lo in range(0, len(targets), chunk)]
    return torch.cat(parts) if parts else x.new_zeros(0)


def target_argmax(x: torch.Tensor, top: nn.Module, chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """The most likely next token at every read position (M,)."""
    parts = [top(x[lo:lo + chunk]).argmax(-1) for lo in range(0, len(x), chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=x.device)


def _chunk_nll(x: torch.Tensor, top: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(top(x), targets, reduction="sum")


def target_loss(x: torch.Tensor, top: nn.Module, targets: torch.Tensor, chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Cross-entropy of the target tokens, mean over the batch's. Over `chunk` positions, each chunk's logits are
    recomputed in backward rather than kept (training holds O(chunk x vocab), not O(tokens x vocab))."""
    if len(targets) <= chunk:
        return F.cross_entropy(top(x), targets)
    from torch.utils.checkpoint import checkpoint

    total = sum(checkpoint(_chunk_nll, x[lo:lo + chunk], top, targets[lo:lo + chunk], use_reentrant=False)
                for lo in range(0, len(targets), chunk))
    return total / len(targets)
