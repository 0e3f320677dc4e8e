"""The vision-language store's Recipe for the shared training loop: the VL side network (model.py), batches of
text states + image tokens from the store, or from both backbones live for --online (data.py), cross-entropy
over the answer set."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from featcache.errors import TrainConfigError, expected
from featcache.images.backbones import ImageBackbone, load_image_backbone
from featcache.kinds.vision_language.kind import (
    store_images,  # --online: the images as the extraction listed them
)
from featcache.reader import StoreReader
from featcache.store import check_match
from featcache.text.backbone import load_backbone

from ...data import iterate, length_bucketed_batches
from ...networks.side_config import SideConfig
from ...recipe import (
    RUN_MANIFEST_KEYS,
    Recipe,
    backbone_config,
    cached_source,
    labelled_splits,
    loss,
    resolved_config,
    select_metric,
)
from .data import IMAGES_PART, CachedVisionLanguage, OnlineVisionLanguage, channel_stats, image_part
from .model import VisionLanguageSide

if TYPE_CHECKING:
    from ...config import TrainConfig

# What `lst predict` needs besides the text facts: both backbones, the image facts, the image part's shape.
VL_RUN_KEYS = (*RUN_MANIFEST_KEYS, "image_backbone", "image", "vision_language", "parts", "dataset")


def has_t5_text(manifest: dict[str, Any]) -> bool:
    """The store's text part is a T5's (the VL-T5 network, t5_recipe.py) rather than an encoder's."""
    return "seq2seq" in manifest


def image_width(manifest: dict[str, Any]) -> int:
    return int(manifest["parts"][IMAGES_PART]["hidden_size"])


def images_per_row(manifest: dict[str, Any]) -> int:
    """k of `--image-column left,right` (1 for stores written before several images per row)."""
    return int(manifest["vision_language"].get("images_per_row", 1))


def image_layers(manifest: dict[str, Any]) -> list[int]:
    """What the image backbone is asked for per token: a CNN's stages (stored concatenated), or layers."""
    return list(manifest["vision_language"]["image_layers"])


def build_model(cfg: TrainConfig, manifest: dict[str, Any]) -> VisionLanguageSide:
    side = SideConfig.resolve(cfg, int(manifest["task"]["num_labels"]), manifest["layers"])
    return VisionLanguageSide(backbone_config(manifest), image_width(manifest), int(manifest["image"]["tokens"]),
                              side, images_per_row(manifest))


def load_image_model(manifest: dict[str, Any], device: str) -> ImageBackbone:
    """The store's image backbone in fp32, checked against the weights the store was made with."""
    facts = manifest["image_backbone"]
    with torch.random.fork_rng(devices=[]):  # loading must not move the run's random stream
        backbone = load_image_backbone(facts["name"], "fp32", device)
    check_match("image backbone weights", facts["revision"], backbone.revision)
    return backbone


def load_text_model(manifest: dict[str, Any], device: str, precision: str = "fp32"):
    with torch.random.fork_rng(devices=[]):
        backbone = load_backbone(manifest["backbone"]["name"], precision, device)
    check_match("backbone weights", manifest["backbone"]["revision"], backbone.revision)
    return backbone


def sources(cfg: TrainConfig, store: StoreReader, device: torch.device) -> dict[str, Any]:
    names = labelled_splits(store)
    if not cfg.online:
        return {n: CachedVisionLanguage(store.split(n), cached_source(store.split(n), cfg, device)) for n in names}
    manifest = store.manifest
    for n in names:  # a store without images fails here, before the backbones load
        image_part(store.split(n))
    text, image = load_text_model(manifest, str(device)), load_image_model(manifest, str(device))
    images = store_images(manifest)
    return {n: OnlineVisionLanguage(store.split(n), text, manifest["layers"], images[n], image,
                                    image_layers(manifest)) for n in names}


@torch.no_grad()
def predict_split(model: torch.nn.Module, source, lengths: np.ndarray, batch_size: int, device: torch.device,
                  amp=None) -> np.ndarray:
    """Answer indices for every question of a split, in the split's order."""
    model.eval()
    batches = length_bucketed_batches(lengths, batch_size * 2, seed=0, epoch=0, shuffle=False)
    out = np.zeros(len(lengths), dtype=np.int64)
    for idx, b in zip(batches, iterate(source, batches, device)):
        with amp or contextlib.nullcontext():
            logits = model(b.hidden, b.mask, b.image).float()
        out[idx] = logits.argmax(-1).cpu().numpy()
    return out


def vision_language_recipe(cfg: TrainConfig, store: StoreReader, device: torch.device,
                           eval_name: str | None) -> Recipe:
    manifest = store.manifest
    task, num_labels = manifest["task"]["type"], manifest["task"]["num_labels"]
    if task != "classification":
        raise TrainConfigError(expected("a classification task (answers) in a vision-language store", task))
    metric = select_metric(cfg, manifest, task)
    if cfg.init == "pruned":
        raise TrainConfigError(expected("--init random for a vision-language store", "--init pruned",
                                        "Pruned init is not wired for the VL side network yet."))
    model = build_model(cfg, manifest)
    model.visual.mean, model.visual.std = channel_stats(store.split(cfg.train_split))  # cached or online: the store's
    model.to(device)
    batches = sources(cfg, store, device)

    def predict(name: str, amp) -> np.ndarray:
        return predict_split(model, batches[name], store.split(name).lengths, cfg.batch_size, device, amp)

    resolved = resolved_config(cfg, manifest, metric, eval_name, tuple(k for k in VL_RUN_KEYS if k in manifest),
                               layers=model.kept_layers)
    return Recipe(model, batches, task, metric, num_labels, resolved,
                  lambda forward, b: loss(task, forward(b.hidden, b.mask, b.image), b.labels, cfg.label_smoothing), predict)
