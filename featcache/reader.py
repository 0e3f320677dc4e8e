"""Reading a feature store back: the public API for stage 2, notebooks and other trainers.

    store = open_store("banking.zarr")
    train = store.split("train")
    ex = train.example(0)                        # dict of tensors for one example
    batch = train.batch([3, 1, 4], layers=[0, 6])  # padded (B, T, n_layers, d) float32 + mask + labels
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from . import store as S
from .errors import StoreError, expected


@dataclass
class Batch:
    hidden: torch.Tensor | None  # (B, T, n_layers, d) float32; None for a token-only batch
    mask: torch.Tensor  # (B, T) bool, True on real tokens
    input_ids: torch.Tensor  # (B, T) long, pad 0
    token_type_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor | None  # (B,)


class SplitReader:
    """One split of a store. Reads lazily; `load()` pulls the hidden states into memory."""

    def __init__(self, group: zarr.Group, name: str, manifest: dict[str, Any]) -> None:
        self.name = name
        self.manifest = manifest
        self.store_dtype: str = manifest["store_dtype"]
        self.layers: list[int] = manifest["layers"]
        self._group = group
        self.offsets = group["offsets"][:]
        self.input_ids = group["input_ids"][:]
        self.token_type_ids = group["token_type_ids"][:]
        self.labels = group["labels"][:] if "labels" in group else None
        self.lengths = np.diff(self.offsets)
        self._hidden = group["hidden"]
        self._memory: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def layer_positions(self, layers: list[int] | None) -> list[int]:
        """Positions in the stored layer axis of the requested hidden_states indices."""
        if layers is None:
            return list(range(len(self.layers)))
        missing = [x for x in layers if x not in self.layers]
        if missing:
            raise StoreError(expected(f"layers {missing} in the store", f"stored layers {self.layers}",
                                      "Re-extract with those --layers, or pick stored ones."))
        return [self.layers.index(x) for x in layers]

    def load(self) -> SplitReader:
        """Read the whole hidden-state array into RAM (in the storage dtype)."""
        if self._memory is None:
            self._memory = self._hidden[:]
        return self

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def nbytes(self) -> int:
        return int(np.prod(self._hidden.shape)) * self._hidden.dtype.itemsize

    def _tokens(self, start: int, stop: int) -> np.ndarray:
        source = self._memory if self._memory is not None else self._hidden
        return source[start:stop]

    def example(self, i: int, layers: list[int] | None = None) -> dict[str, torch.Tensor]:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        hidden = S.decode(self._tokens(lo, hi), self.store_dtype)[:, self.layer_positions(layers)]
        out = {"hidden": hidden, "input_ids": torch.from_numpy(self.input_ids[lo:hi].astype(np.int64))}
        if self.labels is not None:
            out["label"] = torch.as_tensor(self.labels[i])
        return out

    def token_batch(self, indices: list[int] | np.ndarray) -> Batch:
        """Token ids, mask and labels of `indices`, right-padded; no hidden states (for online runs)."""
        idx = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[idx]
        mask = torch.from_numpy(np.arange(int(lengths.max()))[None, :] < lengths[:, None])
        token_index = self._token_index(idx)
        ids = torch.zeros(mask.shape, dtype=torch.long)
        ids[mask] = torch.from_numpy(self.input_ids[token_index].astype(np.int64))
        types = torch.zeros(mask.shape, dtype=torch.long)
        types[mask] = torch.from_numpy(self.token_type_ids[token_index].astype(np.int64))
        labels = torch.from_numpy(self.labels[idx]) if self.labels is not None else None
        return Batch(None, mask, ids, types, labels)

    def _token_index(self, idx: np.ndarray) -> np.ndarray:
        return np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])

    def batch(self, indices: list[int] | np.ndarray, layers: list[int] | None = None) -> Batch:
        """Examples `indices` with their hidden states, right-padded (zeros) to the longest."""
        out = self.token_batch(indices)
        idx = np.asarray(indices, dtype=np.int64)
        pos = self.layer_positions(layers)
        if self._memory is not None:
            flat = self._memory[self._token_index(idx)]
        else:
            flat = np.concatenate([self._hidden[self.offsets[i]:self.offsets[i + 1]] for i in idx])
        if len(pos) < len(self.layers):
            flat = flat[:, pos]
        flat_t = S.decode(flat, self.store_dtype)
        out.hidden = torch.zeros((*out.mask.shape, *flat_t.shape[1:]), dtype=torch.float32)
        out.hidden[out.mask] = flat_t
        return out


class StoreReader:
    """A complete feature store, checked against its manifest before use."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if "://" not in self.path and not Path(self.path).exists():
            raise StoreError(expected("an existing feature store", f"'{path}' (no such path)",
                                      "Create one with `lst extract`."))
        try:
            self._group = zarr.open_group(self.path, mode="r")
        except Exception as err:  # noqa: BLE001 - zarr raises several types for "not a group"
            raise StoreError(expected("a Zarr v3 feature store", f"'{path}' ({type(err).__name__})")) from None
        self.manifest = S.check_manifest(self._group.attrs.get(S.MANIFEST_KEY), self.path)
        if not self.manifest.get("complete"):
            raise StoreError(f"The store at '{path}' is incomplete (extraction did not finish). "
                             "Re-run the same `lst extract` command to resume it.")
        self._splits: dict[str, SplitReader] = {}

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> SplitReader:
        if name not in self.manifest["splits"]:
            raise StoreError(expected(f"split '{name}' in the store", f"splits {self.split_names}"))
        if name not in self._splits:
            group = self._group[name]
            done = group["shard_done"][:]
            if self.manifest["splits"][name]["tokens"] and not done.all():
                raise StoreError(f"Split '{name}' of '{self.path}' has {int((done == 0).sum())} unwritten shards; "
                                 "re-run the extraction to complete it.")
            self._splits[name] = SplitReader(group, name, self.manifest)
        return self._splits[name]


def open_store(path: str | Path) -> StoreReader:
    return StoreReader(path)
