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

    def __init__(self, width: int, n_stored: int, num_outputs: int, top: str, dropout: float, eps: float,
                 pair: bool = False) -> None:
        super().__init__()
        self.top = top
        self.pair = pair  # --pooling pair: each segment pooled, with their difference and product
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(4 * width if pair else width, num_outputs)
        self.gate = nn.Parameter(torch.tensor(GATE_START))
        if top == "layers":
            self.mix = nn.Parameter(torch.zeros(n_stored))  # softmax weights over the stored layers, equal at start

    def states(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, n_stored, d) -> (B, T, d): the last stored layer, or the learned mix of them all."""
        if self.top == "layers":
            return torch.einsum("btld,l->btd", hidden, torch.softmax(self.mix, 0).to(hidden.dtype))
        return hidden[:, :, -1]

    def pooled(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """hidden (B, T, n_stored, d), mask (B, T) or None (every token real) -> (B, d): the mean over real tokens."""
        states = self.states(hidden)
        return states.mean(1) if mask is None else masked_mean(states, mask)

    def features(self, hidden: torch.Tensor, mask: torch.Tensor | None,
                 segments: torch.Tensor | None) -> torch.Tensor:
        """What the backbone term's linear map reads: the normalised pooled state (B, d), or for pairs each text's
        normalised mean with their difference and product (B, 4d)."""
        if not self.pair:
            return self.norm(self.pooled(hidden, mask))
        states = self.states(hidden)
        mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device) if mask is None else mask
        a, b = (self.norm(x) for x in segment_means(states, mask, segments))
        return torch.cat([a, b, (a - b).abs(), a * b], -1)

    def forward(self, side_logits: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor | None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.sigmoid(self.gate)
        return (1 - g) * side_logits + g * self.out(self.dropout(self.features(hidden, mask, segments)))


def backbone_top(width: int, n_stored: int, num_outputs: int, top: str, dropout: float,
                 eps: float, pair: bool = False) -> BackboneTop | None:
    """The module for --top (None for side: LST's head alone, built exactly as before)."""
    return None if top == "side" else BackboneTop(width, n_stored, num_outputs, top, dropout, eps, pair)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, w) states, (B, T) bool -> (B, w): the mean over the masked tokens."""
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp(min=1)


def segment_means(states: torch.Tensor, mask: torch.Tensor,
                  segments: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The means over a sentence pair's first text (token type 0) and second (token type 1)."""
    if segments is None:
        raise ValueError("--pooling pair needs the batch's token types")
    segments = segments.to(mask.device)
    return masked_mean(states, mask & (segments == 0)), masked_mean(states, mask & (segments != 0))


def pair_features(states: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    """--pooling pair: [a, b, |a - b|, a * b] with a, b each text's mean (the features of a sentence-pair head
    over sentence embeddings, as in Sentence-BERT's classification objective)."""
    a, b = segment_means(states, mask, segments)
    return torch.cat([a, b, (a - b).abs(), a * b], dim=-1)
