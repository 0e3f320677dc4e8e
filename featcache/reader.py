"""Reading a feature store back: the public API for stage 2, notebooks and other trainers.

    store = open_store("banking.zarr")
    train = store.split("train")
    ex = train.example(0)                          # dict of tensors for one example
    batch = train.batch([3, 1, 4], layers=[0, 6])  # padded (B, T, n_layers, d) float32 + mask + labels
    for b in train.batches(32, shuffle=True, seed=0): ...

How hidden states are read (`reader=`):
- "shards": a local, uncompressed store (the default layout) is read by memory-mapping each shard
  file and copying each example's rows straight out of it. The shard index (zarr's sharding codec)
  is checked first; a shard whose chunks are not laid out in order is read through zarr instead.
  Measured on MiniLM (benchmarks/bench_store.py, shuffled batches of 32): 0.6-0.9 of numpy gathering
  the same bytes from RAM; zarr-python's own reads reach ~0.002 of it (~1 ms per call), tensorstore
  0.03-0.27 (not a dependency).
- "cache": a remote (fsspec) store's shards fetched whole, one request each, into a local cache
  (`$LST_SHARD_CACHE`, default ~/.cache/lst/shards; files named by the shard's checksum, verified),
  then memory-mapped: later epochs and runs read at local-disk speed.
- "zarr": zarr-python, one orthogonal selection per batch. Used for remote (fsspec) or compressed
  stores, where memory-mapping is impossible.
- "auto" (default): "shards" where possible, "cache" for remote stores with checksums (not memory://),
  else "zarr".
`load()` reads a whole split into RAM; every path then gathers from memory.

A compressed store (`lst extract --components K`, featcache/compress.py) keeps K coefficients per token and
layer; `batch`, `example` and `hidden_rows` give back the states rebuilt on the stored basis (h ~= c U^T + mu,
float32, padding zero), `stored_rows` the coefficients as stored, and `basis` the part's basis.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from . import store as S
from .compress import Basis, read_bases
from .destination import local_path, zarr_location
from .errors import StoreError, expected
from .manifest import compression_of, part_layers
from .plan import ROOT

log = logging.getLogger(__name__)

READERS = ("auto", "shards", "cache", "zarr")
CACHE_ENV = "LST_SHARD_CACHE"  # where remote stores' shards are cached (default ~/.cache/lst/shards)
CHECKSUMS = "shard_crc"  # (n_shards,) uint32 per part: zlib crc32 of hidden (+ scales) bytes
FROZEN_WEIGHTS = "backbone_weights"  # root group of frozen arrays that stage 2 needs without the backbone


@dataclass
class Batch:
    hidden: torch.Tensor | None  # (B, T, n_layers, d) float32; None for a token-only batch
    mask: torch.Tensor  # (B, T) bool, True on real tokens
    input_ids: torch.Tensor  # (B, T) long, pad 0
    token_type_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor | None  # (B,)

    def to(self, device: torch.device) -> Batch:
        """What a side network reads, on `device` (the token ids stay on the host)."""
        return Batch(None if self.hidden is None else self.hidden.to(device, non_blocking=True), self.mask.to(device),
                     self.input_ids, self.token_type_ids, None if self.labels is None else self.labels.to(device))


class _ShardViews:
    """A token-major sharded Zarr array read by memory-mapping its shard files (local, uncompressed).

    `part(k)` is shard k as a plain ndarray view of the file: (rows in shard k, *row_shape).
    """

    def __init__(self, array: zarr.Array) -> None:
        self.array = array
        self.shard_rows = int(array.metadata.chunk_grid.chunk_shape[0])
        self._parts: dict[int, np.ndarray] = {}
        self.mapped: set[int] = set()  # shards read as file views (the others went through zarr)
        codec = array.metadata.codecs[0]
        self.chunk_rows = int(codec.chunk_shape[0])
        self._root = Path(array.store.root) / array.path
        self._row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize

    @staticmethod
    def supported(array: zarr.Array) -> bool:
        """Local store, one sharding codec over raw little-endian bytes, index at the end, sharded on rows only."""
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
        from zarr.storage import LocalStore

        codecs = array.metadata.codecs
        if not isinstance(array.store, LocalStore) or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return False
        shard = codecs[0]
        inner_raw = len(shard.codecs) == 1 and isinstance(shard.codecs[0], BytesCodec) and \
            (shard.codecs[0].endian is None or shard.codecs[0].endian.value == "little")
        index_std = [type(c) for c in shard.index_codecs] == [BytesCodec, Crc32cCodec]
        whole_rows = tuple(array.metadata.chunk_grid.chunk_shape[1:]) == tuple(array.shape[1:]) == \
            tuple(shard.chunk_shape[1:])
        return inner_raw and index_std and whole_rows and shard.index_location.value == "end" and \
            array.dtype.byteorder in ("<", "=", "|")

    def part(self, k: int) -> np.ndarray:
        if k not in self._parts:
            self._parts[k] = self._map(k)
        return self._parts[k]

    def file(self, k: int) -> Path:
        return self._root / self.array.metadata.encode_chunk_key((k,) + (0,) * (self.array.ndim - 1))

    def _map(self, k: int) -> np.ndarray:
        rows = min(self.shard_rows, self.array.shape[0] - k * self.shard_rows)
        path = self.file(k)
        n_chunks = self.shard_rows // self.chunk_rows if self.shard_rows % self.chunk_rows == 0 else -1
        used = -(-rows // self.chunk_rows)  # inner chunks holding real rows
        chunk_bytes = self.chunk_rows * self._row_bytes
        mm = np.memmap(path, dtype=np.uint8, mode="r") if path.is_file() else None
        if mm is not None and n_chunks > 0 and mm.size >= n_chunks * 16 + 4:
            # index: (n_chunks, 2) uint64 (offset, nbytes) then a crc32c; chunks written in order are contiguous
            index = np.frombuffer(bytes(mm[mm.size - 4 - n_chunks * 16:mm.size - 4]), dtype="<u8").reshape(-1, 2)
            start = int(index[0, 0])
            want = start + np.arange(used, dtype=np.uint64) * chunk_bytes
            if (index[:used, 0] == want).all() and (index[:used, 1] == chunk_bytes).all() and \
                    start + used * chunk_bytes <= mm.size:
                view = np.ndarray((used * self.chunk_rows, *self.array.shape[1:]), dtype=self.array.dtype,
                                  buffer=mm, offset=start)
                self.mapped.add(k)
                return view[:rows]
        # an unexpected layout (or a missing shard file): read the shard through zarr, once
        log.debug("shard %d of %s is not memory-mappable; reading it through zarr", k, self._root)
        return self.array[k * self.shard_rows:k * self.shard_rows + rows]


class _CachedShards:
    """Shards of a remote store fetched whole (one request each) into a local cache, then memory-mapped.

    Cache files are named by the shard's recorded checksum, so a re-extracted store never serves stale
    bytes; a shard that fails verification is dropped from the cache and fetched again once.
    """

    def __init__(self, array: zarr.Array, checksums: np.ndarray) -> None:
        self.array = array
        self.shard_rows = int(array.metadata.chunk_grid.chunk_shape[0])
        self._crc = checksums
        key = hashlib.sha1(f"{array.store}/{array.path}".encode()).hexdigest()[:16]
        self._dir = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lst" / "shards") / key
        self._parts: dict[int, np.ndarray] = {}

    def file(self, k: int) -> Path:
        return self._dir / f"{k}-{int(self._crc[k]):08x}.npy"

    def part(self, k: int) -> np.ndarray:
        if k not in self._parts:
            path = self.file(k)
            if not path.is_file():
                data = self.array[k * self.shard_rows:(k + 1) * self.shard_rows]
                self._dir.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, data)
                tmp.replace(path)  # atomic: parallel readers never see half a file
            self._parts[k] = np.load(path, mmap_mode="r")
        return self._parts[k]

    def forget(self, k: int) -> None:
        self._parts.pop(k, None)
        self.file(k).unlink(missing_ok=True)


def _remote_cacheable(array: zarr.Array) -> bool:
    """A remote store worth caching on local disk (memory:// already is RAM)."""
    from zarr.storage import FsspecStore

    store = array.store
    return isinstance(store, FsspecStore) and "memory" not in str(getattr(store.fs, "protocol", ""))


class _Rows:
    """Rows [lo, hi) of a token-major array, gathered from RAM, memory-mapped shards, a local cache of
    a remote store's shards, or zarr."""

    def __init__(self, array: zarr.Array, reader: str, checksums: np.ndarray | None = None) -> None:
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype
        self._memory: np.ndarray | None = None
        self._shards: _ShardViews | _CachedShards | None = None
        if reader in ("auto", "shards") and _ShardViews.supported(array):
            self._shards = _ShardViews(array)
        elif checksums is not None and (reader == "cache" or (reader == "auto" and _remote_cacheable(array))):
            self._shards = _CachedShards(array, checksums)
        if reader == "shards" and self._shards is None:
            raise StoreError(expected("a local, uncompressed store for reader='shards'", f"'{array.store}'",
                                      "Use reader='auto' or 'zarr'."))
        if reader == "cache" and self._shards is None:
            raise StoreError(expected("a store with shard checksums for reader='cache'", f"'{array.store}'",
                                      "Re-extract it with this version of lst, or use reader='zarr'."))

    @property
    def kind(self) -> str:
        if self._memory is not None:
            return "memory"
        if self._shards is None:
            return "zarr"
        return "cache" if isinstance(self._shards, _CachedShards) else "shards"

    def forget(self, k: int) -> bool:
        """Drop a cached copy of shard k (True when there was one to drop)."""
        if isinstance(self._shards, _CachedShards):
            self._shards.forget(k)
            return True
        return False

    @property
    def shard_rows(self) -> int:
        return int(self.array.metadata.chunk_grid.chunk_shape[0])

    def shard(self, k: int) -> np.ndarray:
        """Every stored row of shard k, contiguous (what the writer checksummed)."""
        if self._memory is not None:
            return self._memory[k * self.shard_rows:(k + 1) * self.shard_rows]
        if isinstance(self._shards, _ShardViews) and not self._shards.file(k).is_file():
            raise StoreError("its file is missing")
        if self._shards is not None:
            return np.ascontiguousarray(self._shards.part(k))
        return self.array[k * self.shard_rows:(k + 1) * self.shard_rows]

    def load(self) -> None:
        if self._memory is None:
            self._memory = self.array[:]

    def gather(self, lo: np.ndarray, hi: np.ndarray, cols: list[int] | None = None) -> np.ndarray:
        """Rows lo[i]:hi[i] of every range i, concatenated: (sum(hi - lo), *row_shape[cols])."""
        lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
        if self._memory is None and self._shards is None:
            index = np.concatenate([np.arange(a, z) for a, z in zip(lo, hi)]) if len(lo) else np.zeros(0, np.int64)
            rows = self.array.get_orthogonal_selection((index,))  # one zarr call per batch, not per example
            return rows if cols is None else rows[:, cols]
        tail = self.shape[1:] if cols is None else (len(cols), *self.shape[2:])
        out = np.empty((int((hi - lo).sum()), *tail), dtype=self.dtype)
        pos = 0
        for a, z in zip(lo.tolist(), hi.tolist()):  # contiguous slice copies beat a fancy-index gather
            while a < z:
                part, base = self._part_of(a)
                b = min(z, base + len(part))
                src = part[a - base:b - base]
                out[pos:pos + b - a] = src if cols is None else src[:, cols]
                pos, a = pos + b - a, b
        return out

    def _part_of(self, row: int) -> tuple[np.ndarray, int]:
        if self._memory is not None:
            return self._memory, 0
        k = row // self._shards.shard_rows
        return self._shards.part(k), k * self._shards.shard_rows


class PartReader:
    """A ragged, token-major part of one split: row i owns tokens offsets[i]:offsets[i+1].

    Every kind of store has the split's own part (its examples); some have more under a sub-path
    (T5: `dec`, one row per (example, candidate) decoder pass). Reads lazily; `load()` pulls the
    hidden states into memory.
    """

    def __init__(self, group: zarr.Group, name: str, store_dtype: str, layers: list[int],
                 reader: str = "auto", check_done: bool = True, basis: Basis | None = None) -> None:
        self.name = name
        self.store_dtype = store_dtype
        self.layers: list[int] = list(layers)
        self.basis = basis  # a compressed part's PCA basis: stored values are its coefficients
        self.group = group
        self.offsets = group["offsets"][:]
        self.lengths = np.diff(self.offsets)
        done = group["shard_done"][:]
        if check_done and self.n_tokens and not done.all():
            raise StoreError(f"Split part '{name}' has {int((done == 0).sum())} unwritten shards; "
                             "re-run the extraction to complete it.")
        # crc32 of each shard's bytes, recorded by the writer; stores written before checksums have none
        self._crc = group[CHECKSUMS][:] if CHECKSUMS in group else None
        self._hidden = _Rows(group["hidden"], reader, self._crc)
        # int8 stores: one float32 scale per token and layer, sharded like hidden
        self._scales = _Rows(group["scales"], reader, self._crc) if "scales" in group else None
        self._verified: set[int] = set()

    @property
    def n_shards(self) -> int:
        return -(-self.n_tokens // self._hidden.shard_rows)

    def shard_problem(self, k: int) -> str | None:
        """Why shard k cannot be trusted (missing, unreadable, checksum mismatch), or None when it is sound."""
        if self._crc is None:
            return None
        problem = self._shard_problem(k)
        # a locally cached copy may be what went bad: fetch it again, once
        rows = [self._hidden] + ([self._scales] if self._scales is not None else [])
        if problem is not None:
            dropped = [r.forget(k) for r in rows]  # every cached copy, not just the first
            if any(dropped):
                problem = self._shard_problem(k)
        return problem

    def _shard_problem(self, k: int) -> str | None:
        try:
            crc = zlib.crc32(self._hidden.shard(k))
            if self._scales is not None:
                crc = zlib.crc32(self._scales.shard(k), crc)
        except StoreError as err:
            return str(err)
        except Exception as err:  # noqa: BLE001 - zarr raises ValueError/KeyError/OSError for torn shards
            return f"unreadable ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})"
        return None if crc == int(self._crc[k]) else "checksum mismatch (its bytes changed since they were written)"

    def _check_shards(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Verify, once per process, every shard a read touches; a damaged one is an error, never data."""
        if self._crc is None or len(self._verified) == len(self._crc):
            return
        rows = self._hidden.shard_rows
        touched = {k for a, b in zip(np.asarray(lo).tolist(), np.asarray(hi).tolist()) if b > a
                   for k in range(a // rows, (b - 1) // rows + 1)}
        for k in sorted(touched - self._verified):
            problem = self.shard_problem(k)
            if problem is not None:
                raise StoreError(f"Shard {k} of '{self.name}' is damaged: {problem}. `lst inspect STORE --verify` "
                                 "lists every bad shard; re-running the same `lst extract` recomputes them.")
            self._verified.add(k)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def reader_kind(self) -> str:
        """Where hidden states come from now: 'memory', 'shards' (memory-mapped) or 'zarr'."""
        return self._hidden.kind

    def column(self, name: str) -> np.ndarray:
        """A whole per-row or per-token array stored beside the hidden states (e.g. T5's `candidates`)."""
        if name not in self.group or not isinstance(self.group[name], zarr.Array):
            raise StoreError(expected(f"an array '{name}' in '{self.name}'",
                                      f"arrays {sorted(k for k, _ in self.group.arrays())}"))
        return self.group[name][:]

    def layer_positions(self, layers: list[int] | None) -> list[int]:
        """Positions in the stored layer axis of the requested hidden_states indices."""
        if layers is None:
            return list(range(len(self.layers)))
        missing = [x for x in layers if x not in self.layers]
        if missing:
            raise StoreError(expected(f"layers {missing} in the store", f"stored layers {self.layers}",
                                      "Re-extract with those --layers, or pick stored ones."))
        return [self.layers.index(x) for x in layers]

    def load(self):
        """Read the whole hidden-state array into RAM (in the storage dtype)."""
        self._hidden.load()
        if self._scales is not None:
            self._scales.load()
        return self

    def nbytes(self) -> int:
        return int(np.prod(self._hidden.shape)) * self._hidden.dtype.itemsize

    @property
    def stored_width(self) -> int:
        """Values stored per token and layer: d, or K coefficients in a compressed store."""
        return int(self._hidden.shape[-1])

    def layer_basis(self, layers: list[int] | None) -> Basis | None:
        """The basis of the requested layers (None for full states)."""
        return None if self.basis is None else self.basis.select(self.layer_positions(layers))

    def stored_rows(self, lo: np.ndarray, hi: np.ndarray, layers: list[int] | None = None) -> np.ndarray:
        """The stored values (storage dtype, undecoded; no int8 scales) of token ranges lo[i]:hi[i], concatenated."""
        return self._raw_rows(lo, hi, layers, with_scales=False)[0]

    def stored_scales(self, lo: np.ndarray, hi: np.ndarray, layers: list[int] | None = None) -> np.ndarray | None:
        """int8 stores: the float32 scales of token ranges lo[i]:hi[i], (n, n_layers); None for other dtypes."""
        if self._scales is None:
            return None
        self._check_shards(lo, hi)
        pos = self.layer_positions(layers)
        return self._scales.gather(lo, hi, None if len(pos) == len(self.layers) else pos)

    def hidden_rows(self, lo: np.ndarray, hi: np.ndarray, layers: list[int] | None = None) -> torch.Tensor:
        """Decoded float32 hidden states of token ranges lo[i]:hi[i], concatenated: (n, n_layers, d)."""
        values = S.decode(*self._raw_rows(lo, hi, layers))  # int8: value = q * scale
        basis = self.layer_basis(layers)
        return values if basis is None else basis.reconstruct(values)

    def _raw_rows(self, lo: np.ndarray, hi: np.ndarray, layers: list[int] | None,
                  with_scales: bool = True) -> tuple[np.ndarray, str, np.ndarray | None]:
        """(stored values, storage dtype, int8 scales or None) of token ranges lo[i]:hi[i], concatenated."""
        self._check_shards(lo, hi)
        pos = self.layer_positions(layers)
        cols = None if len(pos) == len(self.layers) else pos
        scales = self._scales.gather(lo, hi, cols) if with_scales and self._scales is not None else None
        return self._hidden.gather(lo, hi, cols), self.store_dtype, scales


class SplitReader(PartReader):
    """One split of a store: its examples (tokens, labels, hidden states) and any further parts."""

    def __init__(self, group: zarr.Group, name: str, manifest: dict[str, Any], reader: str = "auto",
                 bases: dict[str, Basis] | None = None) -> None:
        self._bases = bases or {}
        super().__init__(group, name, manifest["store_dtype"], manifest["layers"], reader,
                         basis=self._bases.get(ROOT))
        self.manifest = manifest
        self._reader = reader
        self.input_ids = group["input_ids"][:]
        self.token_type_ids = group["token_type_ids"][:]
        self.labels = group["labels"][:] if "labels" in group else None
        self._parts: dict[str, PartReader] = {}

    def part(self, name: str) -> PartReader:
        """A further ragged part of this split (T5: 'dec'), with its own offsets, layers and shards."""
        if name not in self._parts:
            layers = part_layers(self.manifest, name)
            if layers is None or name not in self.group:
                raise StoreError(expected(f"a part '{name}' in split '{self.name}'",
                                          f"parts {sorted(self.manifest.get('parts', {'': {}}))}"))
            self._parts[name] = PartReader(self.group[name], f"{self.name}/{name}", self.store_dtype, layers,
                                           self._reader, basis=self._bases.get(name))
        return self._parts[name]

    def example(self, i: int, layers: list[int] | None = None) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise StoreError(expected(f"an example index in 0..{len(self) - 1} of split '{self.name}'", i))
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        out = {"hidden": self.hidden_rows(np.array([lo]), np.array([hi]), layers),
               "input_ids": torch.from_numpy(self.input_ids[lo:hi].astype(np.int64)),
               "token_type_ids": torch.from_numpy(self.token_type_ids[lo:hi].astype(np.int64))}
        if self.labels is not None:
            out["label"] = torch.as_tensor(self.labels[i])
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.example(i)

    def token_batch(self, indices: list[int] | np.ndarray) -> Batch:
        """Token ids, mask and labels of `indices`, right-padded; no hidden states (for online runs)."""
        idx = self._indices(indices)
        lengths = self.lengths[idx]
        mask = torch.from_numpy(np.arange(int(lengths.max()))[None, :] < lengths[:, None])
        token_index = self._token_index(idx)
        ids = torch.zeros(mask.shape, dtype=torch.long)
        ids[mask] = torch.from_numpy(self.input_ids[token_index].astype(np.int64))
        types = torch.zeros(mask.shape, dtype=torch.long)
        types[mask] = torch.from_numpy(self.token_type_ids[token_index].astype(np.int64))
        labels = torch.from_numpy(self.labels[idx]) if self.labels is not None else None
        return Batch(None, mask, ids, types, labels)

    def _indices(self, indices: list[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) == 0 or idx.min() < 0 or idx.max() >= len(self):
            raise StoreError(expected(f"a non-empty list of example indices in 0..{len(self) - 1} "
                                      f"of split '{self.name}'", f"{len(idx)} indices, range "
                                      f"{idx.min() if len(idx) else '-'}..{idx.max() if len(idx) else '-'}"))
        return idx

    def _token_index(self, idx: np.ndarray) -> np.ndarray:
        return np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])

    def batch(self, indices: list[int] | np.ndarray, layers: list[int] | None = None) -> Batch:
        """Examples `indices` with their hidden states, right-padded (zeros) to the longest."""
        out = self.token_batch(indices)
        idx = self._indices(indices)
        raw, dtype, scales = self._raw_rows(self.offsets[idx], self.offsets[idx + 1], layers)
        lengths = self.lengths[idx]
        # padded in the storage dtype, then decoded once: ~3x cheaper than padding decoded float32 rows
        out.hidden = S.decode(_pad(raw, lengths), dtype, None if scales is None else _pad(scales, lengths))
        basis = self.layer_basis(layers)
        if basis is not None:  # rebuilt on the basis; padding stays zero, as in a full store
            out.hidden = basis.reconstruct(out.hidden) * out.mask[:, :, None, None]
        return out

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0,
                layers: list[int] | None = None) -> Iterator[Batch]:
        """One pass over the split in batches (a seeded permutation when `shuffle`)."""
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for b in range(0, len(order), batch_size):
            yield self.batch(order[b:b + batch_size], layers)


def _pad(flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated rows of each example (sum(lengths), ...) -> zero right-padded (B, max(lengths), ...)."""
    out = np.zeros((len(lengths), int(lengths.max()), *flat.shape[1:]), dtype=flat.dtype)
    pos = 0
    for i, n in enumerate(lengths.tolist()):
        out[i, :n] = flat[pos:pos + n]
        pos += n
    return out


class StoreReader:
    """A complete feature store, checked against its manifest before use."""

    def __init__(self, path: str | Path, reader: str = "auto") -> None:
        self.path = str(path)
        if reader not in READERS:
            raise StoreError(expected(f"reader one of {READERS}", reader))
        self.reader = reader
        local = local_path(self.path)  # a file:// URL is read as its local path (memory-mappable)
        if local is not None and not local.exists():
            raise StoreError(expected("an existing feature store", f"'{path}' (no such path)",
                                      "Create one with `lst extract`."))
        try:
            self.group = zarr.open_group(zarr_location(self.path), mode="r")
        except Exception as err:  # noqa: BLE001 - zarr raises several types for "not a group"
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise StoreError(expected("a Zarr v3 feature store", f"'{path}' ({type(err).__name__}: {first})",
                                      "Check the path or URL, its credentials and the network.")) from None
        self.manifest = S.check_manifest(self.group.attrs.get(S.MANIFEST_KEY), self.path,
                                 bare=not dict(self.group.attrs) and not list(self.group.keys()))
        if not self.manifest.get("complete"):
            raise StoreError(f"The store at '{path}' is incomplete (extraction did not finish). "
                             "Re-run the same `lst extract` command to resume it.")
        self.bases = read_bases(self.group, compression_of(self.manifest), self.path)  # {} for full states
        self._splits: dict[str, SplitReader] = {}

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> SplitReader:
        if name not in self.manifest["splits"]:
            raise StoreError(expected(f"split '{name}' in the store", f"splits {self.split_names}"))
        if name not in self._splits:
            self._splits[name] = SplitReader(self.group[name], name, self.manifest, self.reader, self.bases)
        return self._splits[name]

    def frozen_weights(self) -> dict[str, np.ndarray]:
        """Frozen backbone pieces a kind keeps in the store for stage 2 (T5: its LM head and the
        relative-position biases), by name; {} when the store keeps none."""
        if FROZEN_WEIGHTS not in self.group:
            return {}
        return {name: array[:] for name, array in self.group[FROZEN_WEIGHTS].arrays()}


def open_store(path: str | Path, reader: str = "auto") -> StoreReader:
    """Open a complete store for reading. `reader`: 'auto', 'shards' (memory-mapped) or 'zarr'."""
    return StoreReader(path, reader)
