"""Decoding and preprocessing images in worker threads ahead of the forward (`PixelPrefetcher`); results are
keyed by row, so batches keep the images' order whatever thread finishes first."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from .backbones import ImageBackbone
from .datasets import ImageSplit, decode_rgb


def decode_threads() -> int:
    """Worker threads that decode and preprocess images ahead of the forward."""
    return int(os.environ.get("LST_IMAGE_THREADS") or max(1, min(4, (os.cpu_count() or 2) - 1)))


class PixelPrefetcher:
    """Decodes and preprocesses images of one split in worker threads, `ahead` rows beyond the last asked.

    `get(rows)` returns (len(rows), 3, H, W) float32 in the order asked, whatever finished first.
    """

    def __init__(self, split: ImageSplit, backbone: ImageBackbone, threads: int = 2, ahead: int = 64) -> None:
        self.split, self.backbone, self.ahead = split, backbone, ahead
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="lst-images")
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()

    def _one(self, i: int) -> np.ndarray:
        return self.backbone.pixels(decode_rgb(self.split, i))

    def _submit(self, i: int) -> None:
        if i not in self._futures and 0 <= i < len(self.split.items):
            self._futures[i] = self._pool.submit(self._one, i)

    def get(self, rows: list[int]) -> torch.Tensor:
        with self._lock:
            for i in rows:
                self._submit(i)
            last = max(rows)
            for i in range(last + 1, last + 1 + self.ahead):
                self._submit(i)
            futures = [self._futures.pop(i) for i in rows]
        return torch.from_numpy(np.stack([f.result() for f in futures]))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
