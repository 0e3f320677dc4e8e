"""Batches for training through the LM head: each row is an example's prompt followed by one target, as one
causal sequence, from the store (the prompt's states from the split, the target's from its `tgt` part) or from
the live backbone (--online: the prompt run alone, the target run after it, as extraction ran them).

    TargetBatch.hidden  (N, T, n_layers, d)  prompt then target states, right-padded with zeros
    TargetBatch.at      (N, T) bool          positions whose next token is a target token
    TargetBatch.next    (M,) long            those target tokens, in row-major order of `at`
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from featcache.kinds.decoder.backbone import CausalBackbone
from featcache.reader import SplitReader
from featcache.text.splits import pad_batch

from ...data import BatchSource, as_stored, host_policy, mappable


@dataclass
class TargetBatch:
    hidden: torch.Tensor  # (N, T, n_layers, d) float32
    mask: torch.Tensor  # (N, T) bool
    at: torch.Tensor  # (N, T) bool
    next: torch.Tensor  # (M,) long
    row_example: torch.Tensor  # (N,) long: the batch example each row continues
    labels: torch.Tensor | None  # (B,)

    def to(self, device: torch.device) -> TargetBatch:
        move = (lambda t: None if t is None else t.to(device))
        return TargetBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


class TargetSplit:
    """S/tgt of a decoder target store: rows (example, target) of target-token states, read through the store
    reader (memory-mapped where local, as the split's own examples). Rows of one example are adjacent."""

    def __init__(self, split: SplitReader, part: str) -> None:
        self.part = split.part(part)
        self.offsets = self.part.offsets
        self.target_ids = self.part.column("target_ids").astype(np.int64)
        self.per_example = len(self.part) // max(len(split), 1)

    def load(self) -> TargetSplit:
        self.part.load()
        return self

    def rows(self, examples: np.ndarray) -> np.ndarray:
        c = self.per_example
        return (np.asarray(examples)[:, None] * c + np.arange(c)[None, :]).reshape(-1)

    def targets(self, rows: np.ndarray) -> list[list[int]]:
        return [self.target_ids[self.offsets[r]:self.offsets[r + 1]].tolist() for r in rows]

    def hidden(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Target states of `rows` (N, U, n_layers, d), zero on padding, and their mask (N, U)."""
        lengths = self.offsets[rows + 1] - self.offsets[rows]
        mask = torch.from_numpy(np.arange(int(lengths.max()))[None, :] < lengths[:, None])
        flat = self.part.hidden_rows(self.offsets[rows], self.offsets[rows + 1])
        out = torch.zeros((*mask.shape, *flat.shape[1:]), dtype=torch.float32)
        out[mask] = flat
        return out, mask


def target_positions(prompt_lengths: torch.Tensor, targets: list[list[int]], width: int) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """Rows of prompt + target, right-padded to `width`: `at` (N, width) bool, the positions whose next token is
    a target token (the one before each), and `next` (M,) those tokens in row-major order of `at`."""
    at = torch.zeros((len(targets), width), dtype=torch.bool)
    for n, (p, t) in enumerate(zip(prompt_lengths.tolist(), targets)):
        at[n, p - 1:p - 1 + len(t)] = True
    return at, torch.tensor([t for x in targets for t in x], dtype=torch.long)


def join(prompt: torch.Tensor, prompt_mask: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor,
         target_ids: list[list[int]], row_example: torch.Tensor, labels: torch.Tensor | None) -> TargetBatch:
    """Row n: example row_example[n]'s prompt states (B, P, L, d) then its target states (N, U, L, d)."""
    plen = prompt_mask.sum(1)[row_example]  # (N,)
    ulen = target_mask.sum(1)
    n, width = len(row_example), int((plen + ulen).max())
    hidden = torch.zeros((n, width, *prompt.shape[2:]), dtype=prompt.dtype)
    hidden[:, :prompt.shape[1]] = prompt[row_example]  # padding past each prompt is zero
    pos = plen[:, None] + torch.arange(target.shape[1])[None, :]  # (N, U): where target token u sits
    rows = torch.arange(n)[:, None].expand_as(pos)
    hidden[rows[target_mask], pos[target_mask]] = target[target_mask]
    mask = torch.arange(width)[None, :] < (plen + ulen)[:, None]
    at, nxt = target_positions(plen, target_ids, width)
    return TargetBatch(hidden, mask, at, nxt, row_example, labels)


class CachedTargets(BatchSource):
    """Prompt and target states from the store, kept as `sidetrain.data.host_policy` says for both parts."""

    def __init__(self, split: SplitReader, targets: TargetSplit, preload: bool | None = None,
                 memory_budget: float | None = None) -> None:
        nbytes = split.nbytes() + targets.part.nbytes()
        self.policy = host_policy(split, preload, memory_budget, nbytes)
        keep = self.policy == "ram"
        self.split = split.load() if keep else split
        self.targets = targets.load() if keep else targets
        self.held_bytes = nbytes if keep else 0
        self.mapped_bytes = nbytes if not keep and mappable(split) else 0

    def __call__(self, idx: np.ndarray) -> TargetBatch:
        b = self.split.batch(idx)
        rows = self.targets.rows(idx)
        target, target_mask = self.targets.hidden(rows)
        row_example = torch.arange(len(idx)).repeat_interleave(self.targets.per_example)
        return join(b.hidden, b.mask, target, target_mask, self.targets.targets(rows), row_example, b.labels)


class OnlineTargets(BatchSource):
    """--online: the live backbone runs each prompt alone and each prompt + target as one sequence, as
    extraction did, and the batch is joined as the store's is."""

    policy = "online"

    def __init__(self, split: SplitReader, targets: TargetSplit, backbone: CausalBackbone,
                 manifest: dict[str, Any]) -> None:
        self.split, self.targets, self.backbone = split, targets, backbone
        self.layers, self.pad = manifest["layers"], manifest["tokenizer"].get("pad_token_id") or 0

    def __call__(self, idx: np.ndarray) -> TargetBatch:
        ids = self.split.token_batch(idx)
        prompt = self.backbone.hidden_states(ids.input_ids, ids.mask.long(), None, self.layers).cpu()
        prompt = as_stored(self.split, prompt, self.layers) * ids.mask[..., None, None]
        rows = self.targets.rows(idx)
        row_example = torch.arange(len(idx)).repeat_interleave(self.targets.per_example)
        targets = self.targets.targets(rows)
        prompts = [x[m].tolist() for x, m in zip(ids.input_ids, ids.mask)]
        seq_ids, seq_mask = pad_batch([prompts[e] + t for e, t in zip(row_example.tolist(), targets)], self.pad)
        states = self.backbone.hidden_states(seq_ids, seq_mask, None, self.layers).cpu()
        target_mask = torch.from_numpy(np.arange(max(map(len, targets)))[None, :]
                                       < np.array([len(t) for t in targets])[:, None])
        target = torch.zeros((*target_mask.shape, *states.shape[2:]))
        for n, (e, t) in enumerate(zip(row_example.tolist(), targets)):
            target[n, :len(t)] = states[n, len(prompts[e]):len(prompts[e]) + len(t)]
        target = as_stored(self.targets.part, target, self.layers) * target_mask[..., None, None]
        return join(prompt, ids.mask, target, target_mask, targets, row_example, ids.labels)
