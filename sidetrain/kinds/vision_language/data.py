"""Batches for the VL side network: each question's text states (the split's own part, as the encoder kind
reads them) with its image's tokens (the split's `images` part, one row per distinct image, looked up through
the per-question `image_index` column), from the store or from both backbones live (--online).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from featcache.errors import StoreError, expected
from featcache.images.backbones import ImageBackbone
from featcache.images.datasets import ImageSplit
from featcache.images.prefetch import PixelPrefetcher, decode_threads
from featcache.reader import PartReader, SplitReader
from featcache.text.backbone import Backbone

from ...data import BatchSource, OnlineBatches, as_stored, mappable

IMAGES_PART = "images"
IMAGE_INDEX = "image_index"


@dataclass
class VisionLanguageBatch:
    hidden: torch.Tensor  # (B, L, n_layers, d) text states, zero on padding
    mask: torch.Tensor  # (B, L) bool
    image: torch.Tensor  # (B, k * T, n_image_layers, d_img) the image tokens of each question's k images
    labels: torch.Tensor | None  # (B,)

    def to(self, device: torch.device) -> VisionLanguageBatch:
        return VisionLanguageBatch(self.hidden.to(device, non_blocking=True), self.mask.to(device),
                                   self.image.to(device, non_blocking=True),
                                   None if self.labels is None else self.labels.to(device))


def image_part(split: SplitReader) -> tuple[PartReader, np.ndarray]:
    """The split's images part and its per-question image rows; a store without them is refused in one line."""
    manifest = split.manifest
    if IMAGES_PART not in manifest.get("parts", {}) or IMAGES_PART not in split.group:
        raise StoreError(expected(f"a vision-language store with image tokens ('{split.name}/{IMAGES_PART}')",
                                  f"split '{split.name}' without them",
                                  "Re-extract with --image-model (lst extract TEXT_MODEL DATA --image-model ...)."))
    part = split.part(IMAGES_PART)
    index = split.column(IMAGE_INDEX).astype(np.int64)
    if len(index) != len(split) or (len(index) and (index.min() < 0 or index.max() >= len(part))):
        raise StoreError(expected(f"an '{IMAGE_INDEX}' column of {len(split)} rows in 0..{len(part) - 1} in split "
                                  f"'{split.name}'", f"{len(index)} rows, range "
                                  f"{index.min() if len(index) else '-'}..{index.max() if len(index) else '-'}"))
    return part, index


def image_rows(part: PartReader, rows: np.ndarray) -> torch.Tensor:
    """(len(rows), T, n_layers, d_img) float32: the stored tokens of image rows `rows`; rows (B, k): the k
    images of each of B questions one after the other, (B, k * T, n_layers, d_img)."""
    rows = np.asarray(rows)
    flat_rows = rows.reshape(-1)
    offsets = part.offsets
    flat = part.hidden_rows(offsets[flat_rows], offsets[flat_rows + 1])
    return flat.view(len(rows), -1, *flat.shape[1:])


class StoredImages:
    """The stored image tokens of a split's questions, (B, k * T, n_layers, d_img) per batch of question indices
    (in RAM when `preload`, else read where they are)."""

    def __init__(self, split: SplitReader, preload: bool) -> None:
        self.part, self.index = image_part(split)
        self.nbytes = self.part.nbytes()
        if preload:
            self.part.load()

    def __call__(self, idx: np.ndarray) -> torch.Tensor:
        return image_rows(self.part, self.index[np.asarray(idx)])


class LiveImages:
    """The image backbone on the image files, per batch of question indices (each distinct image once), as the
    store holds them (a compressed store: projected onto the images part's basis)."""

    def __init__(self, split: SplitReader, images: ImageSplit, image_backbone: ImageBackbone,
                 image_layers: list[int]) -> None:
        self.part, self.index = image_part(split)
        self.image_backbone, self.image_layers = image_backbone, image_layers
        self.pixels = PixelPrefetcher(images, image_backbone, decode_threads(), ahead=0)

    def __call__(self, idx: np.ndarray) -> torch.Tensor:
        wanted = self.index[np.asarray(idx)]
        rows, where = np.unique(wanted, return_inverse=True)
        states = self.image_backbone.hidden_states(self.pixels.get(rows.tolist()), self.image_layers).cpu()
        states = as_stored(self.part, states)  # (n distinct, T, n_layers, d_img)
        picked = states[torch.from_numpy(where.reshape(-1))]  # (B * k, T, ...)
        return picked.view(len(wanted), -1, *picked.shape[2:])


class WithImages(BatchSource):
    """A text part's batch source (a T5 text part's batches) with each question's image tokens set on the batch
    (`image`); the figures are the text source's plus the stored images held or mapped."""

    def __init__(self, text: BatchSource, images: StoredImages | LiveImages, mapped: bool = False) -> None:
        self.text, self.images = text, images
        self.policy = text.policy
        stored = images.nbytes if isinstance(images, StoredImages) else 0
        self.held_bytes = text.held_bytes + (stored if text.preloaded else 0)
        self.device_bytes = text.device_bytes
        self.mapped_bytes = text.mapped_bytes + (stored if mapped and not text.preloaded else 0)

    def __call__(self, idx: np.ndarray):
        batch = self.text(idx)
        batch.image = self.images(idx)
        return batch


def channel_stats(split: SplitReader, layer: int = -1, rows_at_once: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (floored) per channel of a split's stored image tokens (float64 sums: exact enough)."""
    part, _ = image_part(split)
    total, squares, n = 0.0, 0.0, 0
    for a in range(0, len(part), rows_at_once):
        x = image_rows(part, np.arange(a, min(a + rows_at_once, len(part))))[:, :, layer].flatten(0, 1).double()
        total, squares, n = total + x.sum(0), squares + (x * x).sum(0), n + x.shape[0]
    mean = total / max(n, 1)
    std = (squares / max(n, 1) - mean * mean).clamp(min=0).sqrt()
    return mean.float(), std.clamp(min=1e-3 * float(std.max()) + 1e-6).float()


class CachedVisionLanguage(BatchSource):
    """Text states from `text` (a cached source of the split: RAM, memory-mapped or on the GPU) and image
    tokens from the images part (in RAM when the text states are held in memory; read where they are
    otherwise). The figures are the text source's plus the image part's."""

    def __init__(self, split: SplitReader, text: BatchSource) -> None:
        self.text = text
        self.images = StoredImages(split, text.preloaded)
        self.policy = text.policy
        images = self.images.nbytes
        self.held_bytes = text.held_bytes + (images if text.preloaded else 0)
        self.device_bytes = text.device_bytes
        self.mapped_bytes = text.mapped_bytes + (images if not text.preloaded and mappable(split) else 0)

    def __call__(self, idx: np.ndarray) -> VisionLanguageBatch:
        b = self.text(idx)
        return VisionLanguageBatch(b.hidden, b.mask, self.images(idx), b.labels)


class OnlineVisionLanguage(BatchSource):
    """Classic LST: the text backbone on the stored input ids and the image backbone on the image files, per
    batch (each distinct image of a batch once)."""

    policy = "online"

    def __init__(self, split: SplitReader, backbone: Backbone, layers: list[int], images: ImageSplit,
                 image_backbone: ImageBackbone, image_layers: list[int]) -> None:
        self.text = OnlineBatches(split, backbone, layers)
        self.images = LiveImages(split, images, image_backbone, image_layers)

    def __call__(self, idx: np.ndarray) -> VisionLanguageBatch:
        b = self.text(idx)
        return VisionLanguageBatch(b.hidden, b.mask, self.images(idx), b.labels)
