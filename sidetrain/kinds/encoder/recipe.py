"""The encoder-only store's Recipe for the shared training loop: the LST side network, batches from the
store (or the live backbone for --online), cross-entropy or MSE on the pooled output.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from featcache.backbone import load_backbone
from featcache.reader import SplitReader, StoreReader
from featcache.store import check_match

from ...data import (
    CachedBatches,
    DeviceBatches,
    OnlineBatches,
    fits_on_device,
    iterate,
    length_bucketed_batches,
)
from ...recipe import Recipe, backbone_config, labelled_splits, resolved_config, select_metric
from .model import LadderSideNetwork

if TYPE_CHECKING:
    from ...config import TrainConfig


def build_model(cfg: TrainConfig, manifest: dict[str, Any]) -> LadderSideNetwork:
    stored = manifest["layers"]
    kept = cfg.layers if cfg.layers is not None else [x for x in stored if x > 0]
    return LadderSideNetwork(backbone_config(manifest), manifest["task"]["num_labels"], stored, kept,
                             cfg.reduction_factor, cfg.dropout, cfg.attention_dropout, cfg.pooling, cfg.side_heads)


def init_model(cfg: TrainConfig, store: StoreReader, device: torch.device) -> LadderSideNetwork:
    """The side network on `device`, its blocks Fisher-pruned from the backbone's with --init pruned."""
    model = build_model(cfg, store.manifest).to(device)
    if cfg.init == "pruned":  # side blocks = backbone blocks pruned to 1/r by Fisher information (cached)
        from .prune import init_from_backbone

        init_from_backbone(model, store, cfg.train_split, str(device))
    return model


def loss(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if task == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def predict_split(model: torch.nn.Module, source, split: SplitReader, batch_size: int, task: str,
                  device: torch.device, amp=None) -> np.ndarray:
    """Predictions for every example of a split, in the split's order."""
    model.eval()
    batches = length_bucketed_batches(split.lengths, batch_size * 2, seed=0, epoch=0, shuffle=False)
    out = np.zeros(len(split), dtype=np.float32 if task == "regression" else np.int64)
    for idx, b in zip(batches, iterate(source, batches, device)):
        with amp or contextlib.nullcontext():
            logits = model(b.hidden, b.mask).float()
        out[idx] = (logits.squeeze(-1) if task == "regression" else logits.argmax(-1)).cpu().numpy()
    return out


def sources(cfg: TrainConfig, store: StoreReader, device: torch.device) -> dict[str, Any]:
    """One batch source per labelled split: the store, or the live backbone for --online."""
    names = labelled_splits(store)
    if not cfg.online:
        return {n: cached_source(store.split(n), cfg, device) for n in names}
    manifest = store.manifest
    backbone = load_backbone(manifest["backbone"]["name"], "fp32", str(device))
    check_match("backbone weights", manifest["backbone"]["revision"], backbone.revision)
    return {n: OnlineBatches(store.split(n), backbone, manifest["layers"]) for n in names}


def cached_source(split: SplitReader, cfg: TrainConfig, device: torch.device):
    """A GPU keeps a split in its own memory when it fits --memory-budget (unless --no-preload); otherwise the
    host reads it memory-mapped, from RAM (--preload) or streamed (sidetrain.data.host_policy)."""
    if cfg.preload is not False and fits_on_device(split, device, cfg.memory_budget):
        return DeviceBatches(split, None, device)
    return CachedBatches(split, None, cfg.preload, memory_budget=cfg.memory_budget)


def encoder_recipe(cfg: TrainConfig, store: StoreReader, device: torch.device, eval_name: str | None) -> Recipe:
    manifest = store.manifest
    task, num_labels = manifest["task"]["type"], manifest["task"]["num_labels"]
    metric = select_metric(cfg, manifest, task)
    model = init_model(cfg, store, device)
    batches = sources(cfg, store, device)

    def predict(name: str, amp) -> np.ndarray:
        return predict_split(model, batches[name], store.split(name), cfg.batch_size, task, device, amp)

    return Recipe(model, batches, task, metric, num_labels, resolved_config(cfg, manifest, metric, eval_name),
                  lambda forward, b: loss(task, forward(b.hidden, b.mask), b.labels), predict)
