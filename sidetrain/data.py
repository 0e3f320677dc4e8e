"""Batches for the side network: from the store (cached) or from the live backbone (online).

Both sources walk the same batches in the same order, so that a cached run and an online run with
one seed are the same computation (the core equivalence test of the project).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from featcache.errors import StoreError
from featcache.reader import Batch, PartReader, SplitReader, StoreReader
from featcache.text.backbone import Backbone

log = logging.getLogger(__name__)
PRELOAD_RAM_FRACTION = 0.5  # default memory budget: this share of the free GPU memory or available RAM


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


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# Where a split's hidden states live while a run trains from them (`data_policy`):
#   ram     copied into RAM once, in the storage dtype (anonymous memory: the run holds it)
#   mmap    read from the store's memory-mapped shard files (the page cache: shared, reclaimable)
#   stream  read from the store batch by batch, in a background thread on a GPU or over budget
#   device  copied to the GPU once, in the storage dtype (DeviceBatches)
POLICIES = ("ram", "mmap", "stream", "device")


def budget_bytes(memory_budget: float | None, device: torch.device) -> int:
    """--memory-budget in bytes; default half of the free memory where the data would go (GPU or RAM)."""
    if memory_budget is not None:
        return int(memory_budget * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(PRELOAD_RAM_FRACTION * free)
    return int(PRELOAD_RAM_FRACTION * available_ram())


def mappable(split: SplitReader) -> bool:
    """Hidden states read from memory-mapped files (a local uncompressed store, or a remote one's shard cache)."""
    return split.reader_kind in ("shards", "cache")


def host_policy(split: SplitReader, preload: bool | None, memory_budget: float | None = None,
                nbytes: int | None = None) -> str:
    """ram, mmap or stream for a split read on the host (`nbytes`: what holding it takes, default the split's).

    --preload: ram; --no-preload: stream. By default a memory-mappable store is read in place (mmap: its
    pages are the kernel's page cache, not the run's memory) when it fits the budget, a store that cannot
    be mapped (remote without checksums, compressed) is copied into RAM when it fits, and anything larger
    than the budget is streamed (it would not stay in the page cache: a reader thread hides the disk)."""
    if preload is not None:
        return "ram" if preload else "stream"
    nbytes = split.nbytes() if nbytes is None else nbytes
    if nbytes > budget_bytes(memory_budget, torch.device("cpu")):
        log.info("split '%s' (%.2f GiB) is over the memory budget: streaming it from the store", split.name,
                 nbytes / 2**30)
        return "stream"
    return "mmap" if mappable(split) else "ram"


def should_preload(split: SplitReader, asked: bool | None, memory_budget: float | None = None) -> bool:
    """Whether the split is copied into RAM (the `ram` policy of `host_policy`)."""
    return host_policy(split, asked, memory_budget) == "ram"


def check_finite(batch: Batch, split: SplitReader, indices: np.ndarray) -> None:
    """Refuse NaN/inf activations, naming the split and the first bad example."""
    if torch.isfinite(batch.hidden.sum()):  # one reduction (~20x cheaper than isfinite per element)
        return
    bad = ~torch.isfinite(batch.hidden).flatten(1).all(1)
    if bad.any():
        i = int(np.asarray(indices)[int(bad.nonzero()[0, 0])])
        raise StoreError(f"Expected finite activations in the store. Got NaN/inf in split '{split.name}', "
                         f"example {i}. Re-extract the store (check --precision: fp16 can overflow).")


def token_bytes(split: SplitReader) -> int:
    """What every policy keeps in RAM beside the states: offsets, token ids, types and labels."""
    arrays = [split.offsets, split.input_ids, split.token_type_ids, split.labels]
    return sum(int(a.nbytes) for a in arrays if a is not None)


def data_figures(sources: dict[str, BatchSource], store: StoreReader) -> dict[str, Any]:
    """The data entries of metrics.json's `memory` (run_files.py) for a run's batch sources, by split:
    states copied into RAM / onto the GPU, store bytes read through memory maps, the token arrays, policies."""
    return {"data_held_bytes": sum(s.held_bytes for s in sources.values()),
            "data_device_bytes": sum(s.device_bytes for s in sources.values()),
            "data_mapped_bytes": sum(s.mapped_bytes for s in sources.values()),
            "data_tokens_bytes": sum(token_bytes(store.split(n)) for n in sources),
            "data_policy": {n: s.policy for n, s in sources.items()}}


class BatchSource:
    """A split's batches for the loop: called on example indices, it returns a batch with `.to(device)`.

    Everything the loop and the memory figures read from a source is declared here; the kinds' sources
    (cached or online, their own batch types) subclass it and set what differs."""

    policy: str = "stream"  # where the states live (POLICIES), or "online": the backbone recomputes them
    held_bytes: int = 0  # anonymous host memory held for the states (copied into RAM)
    device_bytes: int = 0  # GPU memory held for the states
    mapped_bytes: int = 0  # store bytes read through memory maps (page cache, reclaimable)

    @property
    def on_device(self) -> bool:
        """Batches are already on the GPU: nothing for a reader thread to hide."""
        return self.policy == "device"

    @property
    def preloaded(self) -> bool:
        """The states are held in memory (RAM or the GPU), so a batch is a gather."""
        return self.policy in ("ram", "device")

    def __call__(self, indices: np.ndarray) -> Any:
        raise NotImplementedError


class CachedBatches(BatchSource):
    """Backbone states read from the store on the host, kept as `host_policy` says (ram, mmap or stream).

    `held_bytes`: anonymous memory the source holds for the states (0 unless copied into RAM);
    `mapped_bytes`: the store bytes it reads through memory maps (page cache, reclaimable).
    """

    def __init__(self, split: SplitReader, layers: list[int] | None, preload: bool | None = None,
                 check_nan: bool = True, memory_budget: float | None = None) -> None:
        self.policy = host_policy(split, preload, memory_budget)
        self.split = split.load() if self.policy == "ram" else split
        self.layers = layers
        self.check_nan = check_nan
        self.held_bytes = split.nbytes() if self.policy == "ram" else 0
        self.mapped_bytes = split.nbytes() if self.policy != "ram" and mappable(split) else 0

    def __call__(self, indices: np.ndarray) -> Batch:
        b = self.split.batch(indices, self.layers)
        if self.check_nan:
            check_finite(b, self.split, indices)
        return b


STORE_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


class DeviceBatches(BatchSource):
    """A split held on the training device (a GPU) in its storage dtype: each batch is gathered and decoded
    there, with no host gather and no host-to-device copy per step. The same batches as CachedBatches."""

    policy = "device"  # host memory: none kept after the copy
    COPY_TOKENS = 1 << 16  # tokens copied to the device at a time (bounds the host memory this needs)

    def __init__(self, split: SplitReader, layers: list[int] | None, device: torch.device) -> None:
        self.split, self.device = split, device
        n, width = split.n_tokens, len(split.layer_positions(layers))
        dtype = STORE_TORCH_DTYPES[split.store_dtype]
        # a compressed store's coefficients stay compressed on the device; each batch is rebuilt there
        basis = split.layer_basis(layers)
        self.basis = None if basis is None else basis.to(device)
        # one zero row past the end: the padding positions of every batch point at it
        self.values = torch.zeros((n + 1, width, split.stored_width), dtype=dtype, device=device)
        self.scales = torch.zeros((n + 1, width), device=device) if split.store_dtype == "int8" else None
        for a in range(0, n, self.COPY_TOKENS):
            lo, hi = np.array([a]), np.array([min(n, a + self.COPY_TOKENS)])
            chunk = torch.from_numpy(np.ascontiguousarray(split.stored_rows(lo, hi, layers)))
            self.values[a:hi[0]] = chunk.view(dtype)  # bf16 is stored as its uint16 bits
            if self.scales is not None:
                self.scales[a:hi[0]] = torch.from_numpy(split.stored_scales(lo, hi, layers))
        self.device_bytes = self.values.nbytes + (0 if self.scales is None else self.scales.nbytes)
        self._check_finite()

    def _check_finite(self) -> None:
        """Once, at load (a per-batch check would wait for the device every step)."""
        for a in range(0, self.split.n_tokens, self.COPY_TOKENS):
            rows = self.values[a:a + self.COPY_TOKENS].float()
            if not torch.isfinite(rows.sum()):
                bad = a + int((~torch.isfinite(rows).flatten(1).all(1)).nonzero()[0, 0])
                example = int(np.searchsorted(self.split.offsets, bad, side="right") - 1)
                raise StoreError(f"Expected finite activations in the store. Got NaN/inf in split "
                                 f"'{self.split.name}', example {example}. Re-extract the store (check --precision: "
                                 "fp16 can overflow).")

    def __call__(self, indices: np.ndarray) -> Batch:
        b = self.split.token_batch(indices)
        idx = np.asarray(indices, dtype=np.int64)
        starts = torch.from_numpy(self.split.offsets[idx].astype(np.int64))
        rows = torch.where(b.mask, starts[:, None] + torch.arange(b.mask.shape[1]), self.split.n_tokens)
        rows = rows.to(self.device)
        hidden = self.values[rows].float()
        if self.scales is not None:
            hidden = hidden * self.scales[rows].unsqueeze(-1)
        if self.basis is not None:  # as the host reader rebuilds it: on the basis, padding zero
            mask = b.mask.to(self.device)
            hidden = self.basis.reconstruct(hidden) * mask[:, :, None, None]
        return Batch(hidden, b.mask.to(self.device), b.input_ids, b.token_type_ids,
                     None if b.labels is None else b.labels.to(self.device))


def fits_on_device(split: SplitReader, device: torch.device, memory_budget: float | None = None) -> bool:
    """A split may take at most the budget of device memory (default: half of what is free; the rest is the
    side network's and its activations')."""
    if device.type != "cuda":
        return False
    return split.nbytes() <= budget_bytes(memory_budget, device)


def as_stored(part: PartReader, hidden: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
    """Live states (..., n_layers, d) as the store gives them back: a compressed store's projection onto its basis
    (so cached == online holds with fp32 coefficients); unchanged for a store of full states."""
    basis = part.layer_basis(layers)
    return hidden if basis is None else basis.to(hidden.device).roundtrip(hidden)


class OnlineBatches(BatchSource):
    """Classic LST: the backbone recomputes the states from the stored input ids on every batch."""

    policy = "online"

    def __init__(self, split: SplitReader, backbone: Backbone, layers: list[int]) -> None:
        self.split = split
        self.backbone = backbone
        self.layers = layers

    def __call__(self, indices: np.ndarray) -> Batch:
        ids_only = self.split.token_batch(indices)
        hidden = self.backbone.hidden_states(ids_only.input_ids, ids_only.mask.long(), ids_only.token_type_ids,
                                             self.layers).cpu()
        hidden = as_stored(self.split, hidden, self.layers)
        hidden = hidden * ids_only.mask[..., None, None]  # padded positions as the store has them: zero
        return Batch(hidden, ids_only.mask, ids_only.input_ids, ids_only.token_type_ids, ids_only.labels)


def iterate(source, batches: list[np.ndarray], device: torch.device) -> Iterator[Batch]:
    for idx in batches:
        yield source(idx).to(device)  # a source returns a batch with .to(device): a store Batch, T5's Seq2SeqBatch


class Prefetcher:
    """Reads batches in a background thread, `depth` ahead; counts the seconds the consumer waits.

    Reading is numpy/zarr/torch work that releases the GIL, so it overlaps the side step. Only reads
    happen in the thread: no random numbers are drawn there, so a run stays reproducible.
    """

    _DONE = object()

    def __init__(self, source, batches: list[np.ndarray], device: torch.device, depth: int = 3) -> None:
        self.wait_seconds = 0.0
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source, batches, device), daemon=True)
        self._thread.start()

    def _run(self, source, batches, device) -> None:
        try:
            for idx in batches:
                if self._stop.is_set():
                    return
                self._q.put(source(idx).to(device))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self._q.put(err)
            return
        self._q.put(self._DONE)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            t0 = time.perf_counter()
            item = self._q.get()
            self.wait_seconds += time.perf_counter() - t0
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the thread early (a run that stops mid-epoch)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get_nowait()
            except queue.Empty:
                self._thread.join(0.01)


def batch_stream(source, batches: list[np.ndarray], device: torch.device, prefetch: bool):
    """An iterable of batches with a `wait_seconds` counter (prefetched in a thread, or read inline)."""
    return Prefetcher(source, batches, device) if prefetch else _Inline(source, batches, device)


class _Inline:
    def __init__(self, source, batches, device) -> None:
        self.source, self.batches, self.device, self.wait_seconds = source, batches, device, 0.0

    def __iter__(self) -> Iterator[Batch]:
        for idx in self.batches:
            t0 = time.perf_counter()
            b = self.source(idx).to(self.device)
            self.wait_seconds += time.perf_counter() - t0
            yield b

    def close(self) -> None:
        pass
