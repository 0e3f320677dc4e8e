"""The encoder-only store's Recipe for the shared training loop: the LST side network, batches from the
store (or the live backbone for --online), cross-entropy or MSE on the pooled output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from featcache.reader import StoreReader
from featcache.store import check_match
from featcache.text.backbone import load_backbone

from ...data import (
    OnlineBatches,
)
from ...networks.encoder_stack import LadderSideNetwork
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

if TYPE_CHECKING:
    from ...config import TrainConfig


def build_model(cfg: TrainConfig, manifest: dict[str, Any]) -> LadderSideNetwork:
    side = SideConfig.resolve(cfg, int(manifest["task"]["num_labels"]), manifest["layers"])
    return LadderSideNetwork(backbone_config(manifest), side)


def init_model(cfg: TrainConfig, store: StoreReader, device: torch.device) -> LadderSideNetwork:
    """The side network on `device`, its blocks Fisher-pruned from the backbone's with --init pruned."""
    model = build_model(cfg, store.manifest).to(device)
    if cfg.init == "pruned":  # side blocks = backbone blocks pruned to 1/r by Fisher information (cached)
        from .prune import init_from_backbone

        init_from_backbone(model, store, cfg.train_split, str(device))
    return model


def sources(cfg: TrainConfig, store: StoreReader, device: torch.device) -> dict[str, Any]:
    """One batch source per labelled split: the store, or the live backbone for --online."""
    names = labelled_splits(store)
    if not cfg.online:
        return {n: cached_source(store.split(n), cfg, device) for n in names}
    manifest = store.manifest
    backbone = load_backbone(manifest["backbone"]["name"], "fp32", str(device))
    check_match("backbone weights", manifest["backbone"]["revision"], backbone.revision)
    return {n: OnlineBatches(store.split(n), backbone, manifest["layers"]) for n in names}


def encoder_recipe(cfg: TrainConfig, store: StoreReader, device: torch.device, eval_name: str | None) -> Recipe:
    manifest = store.manifest
    task, num_labels = manifest["task"]["type"], manifest["task"]["num_labels"]
    metric = select_metric(cfg, manifest, task)
    model = init_model(cfg, store, device)
    batches = sources(cfg, store, device)

    def predict(name: str, amp) -> np.ndarray:
        return predict_split(model, batches[name], store.split(name), cfg.batch_size, task, device, amp)

    resolved = resolved_config(cfg, manifest, metric, eval_name, layers=model.kept_layers)
    return Recipe(model, batches, task, metric, num_labels, resolved,
                  lambda forward, b: loss(task, forward(b.hidden, b.mask), b.labels, cfg.label_smoothing), predict)
