"""Batches for the side network: from the store (cached) or from the live backbone (online).

Both sources walk the same batches in the same order, so that a cached run and an online run with
one seed are the same computation (the core equivalence test of the project).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from featcache.backbone import Backbone
from featcache.reader import Batch, SplitReader


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                            shuffle: bool = True, bucket_batches: int = 50) -> list[np.ndarray]:
    """Shuffled batches of similar-length examples (little padding), reproducible from (seed, epoch)."""
    n = len(lengths)
    if not shuffle:
        order = np.argsort(lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    window = batch_size * bucket_batches
    batches = []
    for w in range(0, n, window):
        chunk = order[w:w + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class CachedBatches:
    """Backbone states read from the store (kept in memory when `preload`)."""

    def __init__(self, split: SplitReader, layers: list[int] | None, preload: bool = True) -> None:
        self.split = split.load() if preload else split
        self.layers = layers

    def __call__(self, indices: np.ndarray) -> Batch:
        return self.split.batch(indices, self.layers)


class OnlineBatches:
    """Classic LST: the backbone recomputes the states from the stored input ids on every batch."""

    def __init__(self, split: SplitReader, backbone: Backbone, layers: list[int]) -> None:
        self.split = split
        self.backbone = backbone
        self.layers = layers

    def __call__(self, indices: np.ndarray) -> Batch:
        ids_only = self.split.token_batch(indices)
        hidden = self.backbone.hidden_states(ids_only.input_ids, ids_only.mask.long(), ids_only.token_type_ids,
                                             self.layers).cpu()
        hidden = hidden * ids_only.mask[..., None, None]  # padded positions as the store has them: zero
        return Batch(hidden, ids_only.mask, ids_only.input_ids, ids_only.token_type_ids, ids_only.labels)


def iterate(source, batches: list[np.ndarray], device: torch.device) -> Iterator[Batch]:
    for idx in batches:
        b = source(idx)
        yield Batch(b.hidden.to(device, non_blocking=True), b.mask.to(device), b.input_ids, b.token_type_ids,
                    None if b.labels is None else b.labels.to(device))
