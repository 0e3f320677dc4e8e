"""Memory of a block of work: CUDA allocator counters on GPU, sampled process memory on the host.

On the host the figure that matters is anonymous memory (RssAnon: what the kernel cannot give back without
killing the process). A memory-mapped store's pages count as RssFile: clean page cache, shared with every
process that maps the same files and reclaimable at any time, so it is reported beside, never added in.
"""

from __future__ import annotations

import os
import threading

import torch
from typing_extensions import Self

_PAGE = os.sysconf("SC_PAGE_SIZE")
STATUS_FIELDS = ("RssAnon", "RssFile", "RssShmem", "VmHWM")


def rss_bytes() -> int:
    """Resident memory of this process, every kind together (anonymous + file-backed + shared)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def status_bytes(pid: int | str = "self") -> dict[str, int]:
    """RssAnon, RssFile, RssShmem and VmHWM of a process in bytes, from /proc/<pid>/status ({} once it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in STATUS_FIELDS:
                    out[key] = int(value.split()[0]) * 1024  # the kernel reports kB
    except (OSError, ValueError):
        return {}
    return out


def anon_bytes() -> int:
    return status_bytes().get("RssAnon", 0)


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then:

    peak_bytes      the block's peak above its entry level: CUDA max allocated on a GPU, else anonymous RSS
    peak_rss_anon   whole-process peak of RssAnon seen during the block (bytes, absolute)
    peak_rss_file   whole-process peak of RssFile (page cache of memory-mapped files: reclaimable)
    start_rss_anon  RssAnon at entry
    """

    def __init__(self, device: torch.device, interval: float = 0.01) -> None:
        self.device, self.interval = device, interval
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_anon_above_start"
        self.start_rss_anon = self.peak_rss_anon = self.peak_rss_file = 0
        self._stop = threading.Event()

    def _take(self) -> None:
        s = status_bytes()
        self.peak_rss_anon = max(self.peak_rss_anon, s.get("RssAnon", 0))
        self.peak_rss_file = max(self.peak_rss_file, s.get("RssFile", 0))

    def update(self) -> Self:
        """Take a sample now (read the peaks so far before the block ends)."""
        self._take()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._take()
        self.start_rss_anon = self.peak_rss_anon
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._take()
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak_bytes = self.peak_rss_anon - self.start_rss_anon


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def model_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers (frozen ones included: they are resident too)."""
    return tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())


def gradient_bytes(params) -> int:
    """Gradients of the trained parameters, as large as the parameters (computed, not sampled: they are
    freed between steps by zero_grad(set_to_none=True) and exist again at every backward)."""
    return tensor_bytes(p for p in params if p.requires_grad)


def optimizer_bytes(optim: torch.optim.Optimizer) -> int:
    """Every tensor the optimizer keeps per parameter (AdamW: exp_avg, exp_avg_sq, step; L-BFGS: its
    direction and step histories, lists of tensors)."""
    def flat(values):
        for v in values:
            yield from (v if isinstance(v, (list, tuple)) else (v,))

    return sum(tensor_bytes(flat(state.values())) for state in optim.state.values())
