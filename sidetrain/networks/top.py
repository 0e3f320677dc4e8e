"""What the classifier reads at the top of a side network (`--top`, TrainConfig.top), shared by every kind
whose side network ends in a classification head over pooled states (encoder, vision_language, image).

    side     logits = Head(side)                                             (LST)
    last     logits = (1 - g) Head(side) + g W LayerNorm(pool(h_last))       (QST's gate at the top)
    layers   logits = (1 - g) Head(side) + g W LayerNorm(pool(sum_l w_l h_l)), w = softmax(v)  (UniPT's mix)

g = sigmoid(z) is learned and starts at sigmoid(2) = 0.88, so a run starts near the linear probe (a linear
map of the backbone's pooled last stored layer, which the store already holds) and learns how much the side
network adds; pool is the mean over an example's real tokens.
"""

from __future__ import annotations

import torch
from torch import nn

GATE_START = 2.0  # the gate's logit z at start: the backbone term has sigmoid(2) = 0.88 of the weight


class BackboneTop(nn.Module):
    """The backbone term of --top last|layers: pooled stored states -> logits, and the gate that mixes them."""

    def __init__(self, width: int, n_stored: int, num_outputs: int, top: str, dropout: float, eps: float) -> None:
        super().__init__()
        self.top = top
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width, num_outputs)
        self.gate = nn.Parameter(torch.tensor(GATE_START))
        if top == "layers":
            self.mix = nn.Parameter(torch.zeros(n_stored))  # softmax weights over the stored layers, equal at start

    def pooled(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """hidden (B, T, n_stored, d), mask (B, T) or None (every token real) -> (B, d)."""
        if self.top == "layers":
            states = torch.einsum("btld,l->btd", hidden, torch.softmax(self.mix, 0).to(hidden.dtype))
        else:
            states = hidden[:, :, -1]
        if mask is None:
            return states.mean(1)
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp(min=1)

    def forward(self, side_logits: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        g = torch.sigmoid(self.gate)
        return (1 - g) * side_logits + g * self.out(self.dropout(self.norm(self.pooled(hidden, mask))))


def backbone_top(width: int, n_stored: int, num_outputs: int, top: str, dropout: float,
                 eps: float) -> BackboneTop | None:
    """The module for --top (None for side: LST's head alone, built exactly as before)."""
    return None if top == "side" else BackboneTop(width, n_stored, num_outputs, top, dropout, eps)
