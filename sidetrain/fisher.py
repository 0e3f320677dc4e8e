"""Empirical Fisher information for `--init pruned`, shared by every kind (docs/design.md section 1).

A side block starts as the backbone block it sits beside, structurally pruned to 1/r of its channels,
the channels ranked by the empirical Fisher information: the sum over batches of the squared gradient
of a task loss, over the first ~1024 training examples. This module holds what does not depend on the
kind of backbone:

- `example_batches`: the first n examples in batches of similar length (less padding; a fixed order);
- `fisher_information`: the accumulation itself (model, batches, a loss callable, the parameters to
  score -> their squared-gradient sums);
- the score cache beside the store (`cache_path`, `cache_meta`, `read_cached_scores`,
  `write_cached_scores`, `cached_scores`): scores depend on neither r nor the kept layers, so every
  trial of a search slices from the same file;
- the channel ranking (`top_channels`, `top_per_head`).

Each kind's prune.py keeps its loss, how its parameter names map to channel groups, and how the pruned
weights are copied into its side blocks.

Which weights are scored, for every kind: exactly the backbone weights that the kind's `pruned_init`
copies into the side network, i.e. the transformer blocks (for T5 also each stack's final layer norm,
which starts the side's final norm). Only those are ever ranked: a score on an embedding, the LM head or
a pooler would be computed and thrown away, and those are the largest gradients (vocab x d). Other
weights stay frozen during the pass (no gradient is taken into them), which changes no score.

Cache format 2 (this module): T5 batches are now length-sorted like the encoder's (they were taken in
store order), which changes T5 scores; files written before carry no format and are recomputed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from featcache.reader import StoreReader

log = logging.getLogger(__name__)
N_EXAMPLES = 1024  # the paper's budget
BATCH_SIZE = 16
FORMAT = "2"  # bump whenever the scores a file would hold change: older files are then recomputed, not reused
B = TypeVar("B")


# ---------------------------------------------------------------- the accumulation

def example_batches(lengths: np.ndarray, n: int, batch_size: int = BATCH_SIZE) -> list[np.ndarray]:
    """The first `n` examples, sorted by length (stable) and cut into batches: similar lengths per
    batch, so little padding, and the same batches on every run."""
    order = np.argsort(np.asarray(lengths)[:n], kind="stable")
    return [order[b:b + batch_size] for b in range(0, n, batch_size)]


def fisher_information(model: nn.Module, batches: Iterable[B], loss: Callable[[B], torch.Tensor],
                       params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """For every parameter in `params`: the sum over `batches` of the squared gradient of `loss(batch)`
    (fp32, same key, shape and device). A weight the loss does not reach scores 0.

    The model runs in eval mode (no dropout); gradients are taken into `params` only, the rest stays
    frozen. Training mode and every `requires_grad` flag are restored afterwards; `.grad` is untouched.
    """
    names, tensors = list(params), list(params.values())
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    flags, training = [p.requires_grad for p in tensors], model.training
    model.eval()
    try:
        for p in tensors:
            p.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(loss(batch), tensors, allow_unused=True)
            for k, g in zip(names, grads):
                if g is not None:
                    fisher[k] += g.detach().float() ** 2
    finally:
        for p, flag in zip(tensors, flags):
            p.requires_grad_(flag)
        model.train(training)
    return fisher


# ---------------------------------------------------------------- the cache beside the store

def cache_path(store: StoreReader, *parts: object) -> Path | None:
    """`<store>.fisher[-<part>...].safetensors` (parts made file-name safe); None for a remote store."""
    if "://" in store.path:
        return None
    suffix = "".join("-" + re.sub(r"[^\w.-]", "_", str(p)) for p in parts)
    return Path(f"{store.path.rstrip('/')}.fisher{suffix}.safetensors")


def cache_meta(split: str, n: int, backbone_revision: object) -> dict[str, str]:
    """What cached scores must have been computed for: the split, the example count, the backbone
    weights and this module's format."""
    return {"split": split, "n_examples": str(n), "backbone_revision": str(backbone_revision), "format": FORMAT}


def read_cached_scores(path: Path | None, meta: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """Scores cached at `path` when they were computed for `meta`; None otherwise (a re-extracted store
    with other weights, another count, a file of an older format: recomputed)."""
    if path is None or not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        if f.metadata() != meta:
            return None
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable


def write_cached_scores(path: Path | None, scores: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Written whole, then renamed: parallel sweep workers see the whole file or none. None: a remote store."""
    if path is None:
        log.info("Fisher scores over %s examples computed (remote store: not cached)", meta["n_examples"])
        return
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous().cpu() for k, v in scores.items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    log.info("Fisher scores over %s examples cached in %s", meta["n_examples"], path)


def cached_scores(path: Path | None, meta: dict[str, str],
                  compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The scores cached for `meta`, else `compute()`d (only then is a backbone needed) and cached."""
    scores = read_cached_scores(path, meta)
    if scores is None:
        scores = compute()
        write_cached_scores(path, scores, meta)
    return scores


# ---------------------------------------------------------------- channel ranking

def top_channels(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k best-scored channels, in their original order (r = 1 keeps a block exactly as it is)."""
    return torch.sort(torch.topk(scores, k).indices).values


def top_per_head(scores: torch.Tensor, heads: int, k: int) -> torch.Tensor:
    """The k best-scored dims inside every head (scores: heads * head_dim), so the head count is kept."""
    per_head = scores.view(heads, -1)
    idx = torch.sort(torch.topk(per_head, k, dim=1).indices, dim=1).values
    return (idx + torch.arange(heads)[:, None] * per_head.shape[1]).reshape(-1)
