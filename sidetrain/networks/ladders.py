"""The ladders of an LST side network (docs/design.md section 1), shared by every kind's side network.

    s = W_emb h_0 + b_emb                                 # embedding ladder, d -> d/r
    for j, i in enumerate(K):                             # kept backbone layers
        mu_j = sigmoid(alpha_j / T)
        s = mu_j * s + (1 - mu_j) * (W_j h_i + b_j)       # ladder j, d -> d/r, then side block j

A kind's network owns the side blocks and calls `Ladders` for the projections and `mix` before
each block; an encoder-decoder network has one `Ladders` per stack.
"""

from __future__ import annotations

import torch
from torch import nn

from featcache.errors import TrainConfigError, expected

GATE_TEMPERATURE = 0.1  # mu = sigmoid(alpha / T): a gate moves 1/T times faster than its parameter


def stored_blocks(stored: list[int]) -> list[int]:
    """The stored block layers (hidden_states indices > 0), which ladders may read (0: the embedding ladder's)."""
    return [x for x in stored if x > 0]


def kept_blocks(stored: list[int], kept: list[int] | None, flag: str = "--layers") -> list[int]:
    """The kept block layers (default: every stored block), checked against the stored layers."""
    if 0 not in stored:
        raise TrainConfigError(expected("layer 0 (the embedding output) in the store for the embedding ladder",
                                        f"stored layers {stored}"))
    blocks = stored_blocks(stored)
    kept = blocks if kept is None else list(kept)
    bad = [k for k in kept if k not in blocks]
    if bad or not kept:
        raise TrainConfigError(expected(f"{flag} among the stored block layers {blocks}",
                                        f"{kept or 'none'} ({bad or 'none'} out of range)",
                                        "Pick stored layers (0, the embedding output, always feeds the "
                                        "embedding ladder), or re-extract with more --layers."))
    if sorted(set(kept)) != kept:
        raise TrainConfigError(expected(f"{flag} in increasing order without repeats", kept))
    return kept


class Ladders(nn.Module):
    """Embedding ladder + one gated ladder per kept layer (d -> d/r) over stored states (B, T, n_stored, d)."""

    def __init__(self, d: int, ds: int, stored: list[int], kept: list[int]) -> None:
        super().__init__()
        self.emb_pos = stored.index(0)
        positions = [stored.index(k) for k in kept]
        self.register_buffer("pos", torch.tensor(positions), persistent=False)
        # kept layers stored side by side (the usual case) are a slice: a view, where indexing copies the batch
        run = positions == list(range(positions[0], positions[0] + len(positions)))
        self.slice = slice(positions[0], positions[0] + len(positions)) if run else None
        self.embed = nn.Linear(d, ds)
        # All ladder projections in one contraction: (K, d, d/r) weights, (K, d/r) biases.
        self.weight = nn.Parameter(torch.empty(len(positions), d, ds))
        self.bias = nn.Parameter(torch.zeros(len(positions), ds))
        nn.init.normal_(self.weight, std=d ** -0.5)
        self.alpha = nn.Parameter(torch.zeros(len(positions)))  # mu = 0.5 at init

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden (B, T, n_stored, d) -> start (B, T, ds), ladders (B, T, K, ds), gates (K,)."""
        start = self.embed(hidden[:, :, self.emb_pos])
        kept = hidden[:, :, self.slice] if self.slice else hidden[:, :, self.pos]
        ladders = torch.einsum("btkd,kds->btks", kept, self.weight) + self.bias
        return start, ladders, torch.sigmoid(self.alpha / GATE_TEMPERATURE)


def mix(s: torch.Tensor, ladders: torch.Tensor, gates: torch.Tensor, j: int) -> torch.Tensor:
    """Block j's input: mu_j * s + (1 - mu_j) * ladder_j."""
    return gates[j] * s + (1 - gates[j]) * ladders[:, :, j]
