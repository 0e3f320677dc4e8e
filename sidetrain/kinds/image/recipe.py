"""The image store's Recipe for the shared training loop: the image side network, batches from the store (or
the live image backbone on the images for --online), cross-entropy on the pooled side output."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from featcache.config import ExtractConfig
from featcache.errors import StoreError
from featcache.images.backbones import ImageBackbone, load_image_backbone
from featcache.images.datasets import ImageSplit
from featcache.images.part import image_splits
from featcache.images.prefetch import PixelPrefetcher, decode_threads
from featcache.reader import Batch, SplitReader, StoreReader
from featcache.store import check_match

from ...data import BatchSource, as_stored
from ...networks.side_config import SideConfig
from ...recipe import (
    Recipe,
    backbone_config,
    cached_source,
    labelled_splits,
    loss,
    predict_split,
    resolved_config,
    select_metric,
)
from .model import ConvSide, VisionTransformerSide

if TYPE_CHECKING:
    from ...config import TrainConfig

IMAGE_RUN_KEYS = ("backbone", "tokenizer", "layers", "task", "max_length", "store_dtype", "precision",
                  "hidden_size", "image")


def is_cnn(manifest: dict[str, Any]) -> bool:
    return manifest["image"]["family"] == "cnn"


def build_model(cfg: TrainConfig, manifest: dict[str, Any]) -> torch.nn.Module:
    """A CNN's side network over its stored stages (--layers names stages), or a vision transformer's."""
    cnn = is_cnn(manifest)
    side = SideConfig.resolve(cfg, int(manifest["task"]["num_labels"]), stored_layers(manifest),
                              "--layers (CNN stages)" if cnn else "--layers")
    if cnn:
        image = manifest["image"]
        return ConvSide(image["widths"], image["channel_starts"], int(image["tokens"]), side)
    return VisionTransformerSide(backbone_config(manifest), side)


def stored_layers(manifest: dict[str, Any]) -> list[int]:
    """What the backbone computes per token: the stored layers, or a CNN's stored stages."""
    return manifest["image"]["stages"] if is_cnn(manifest) else manifest["layers"]


def load_store_backbone(manifest: dict[str, Any], device: str) -> ImageBackbone:
    """The store's backbone in fp32, checked against the weights the store was made with."""
    with torch.random.fork_rng(devices=[]):  # loading must not move the run's random stream
        backbone = load_image_backbone(manifest["backbone"]["name"], "fp32", device)
    check_match("backbone weights", manifest["backbone"]["revision"], backbone.revision)
    return backbone


def store_images(manifest: dict[str, Any]) -> dict[str, ImageSplit]:
    """The store's images, listed again from its recorded dataset options; refused if their content changed."""
    names = {f.name for f in dataclasses.fields(ExtractConfig)}
    cfg = ExtractConfig(**{k: v for k, v in manifest["extract_config"].items() if k in names})
    found, _, fingerprint, _ = image_splits(cfg)
    if fingerprint != manifest["dataset"]["fingerprint"]:
        raise StoreError(f"The images at '{cfg.dataset}' changed since the store was written (content fingerprint "
                         f"{fingerprint}, store {manifest['dataset']['fingerprint']}); --online needs the same images.")
    return found


class OnlineImageBatches(BatchSource):
    """Classic LST on images: the backbone recomputes every state from the image files on each batch."""

    policy = "online"

    def __init__(self, split: SplitReader, images: ImageSplit, backbone: ImageBackbone, layers: list[int]) -> None:
        self.split, self.backbone, self.layers = split, backbone, layers
        self.pixels = PixelPrefetcher(images, backbone, decode_threads(), ahead=0)

    def __call__(self, indices: np.ndarray) -> Batch:
        b = self.split.token_batch(indices)
        b.hidden = self.backbone.hidden_states(self.pixels.get([int(i) for i in indices]), self.layers).cpu()
        b.hidden = as_stored(self.split, b.hidden)  # a compressed store: projected onto its basis, as stored
        return b


def sources(cfg: TrainConfig, store: StoreReader, device: torch.device) -> dict[str, Any]:
    names = labelled_splits(store)
    if not cfg.online:
        return {n: cached_source(store.split(n), cfg, device) for n in names}
    manifest = store.manifest
    backbone = load_store_backbone(manifest, str(device))
    images = store_images(manifest)
    return {n: OnlineImageBatches(store.split(n), images[n], backbone, stored_layers(manifest)) for n in names}


def image_recipe(cfg: TrainConfig, store: StoreReader, device: torch.device, eval_name: str | None) -> Recipe:
    manifest = store.manifest
    task, num_labels = manifest["task"]["type"], manifest["task"]["num_labels"]
    metric = select_metric(cfg, manifest, task)
    model = build_model(cfg, manifest).to(device)
    batches = sources(cfg, store, device)

    def predict(name: str, amp) -> np.ndarray:
        return predict_split(model, batches[name], store.split(name), cfg.batch_size, task, device, amp)

    resolved = resolved_config(cfg, manifest, metric, eval_name, IMAGE_RUN_KEYS, layers=model.kept_layers)
    return Recipe(model, batches, task, metric, num_labels, resolved,
                  lambda forward, b: loss(task, forward(b.hidden, b.mask), b.labels, cfg.label_smoothing), predict)
