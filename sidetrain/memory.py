"""Peak memory of a block of work: CUDA allocator counters on GPU, sampled process RSS on CPU."""

from __future__ import annotations

import os
import threading

import torch
from typing_extensions import Self

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak_bytes` (above the level at entry, on CPU)."""

    def __init__(self, device: torch.device, interval: float = 0.01) -> None:
        self.device, self.interval = device, interval
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_above_start"
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._start = self._peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, rss_bytes()) - self._start
