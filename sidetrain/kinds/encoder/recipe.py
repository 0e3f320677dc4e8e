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


def build_model(cfg: TrainConfig, manifest: dict[str, Any], not_pairs: str | None = None) -> LadderSideNetwork:
    """The side network of a run (`not_pairs`: see SideConfig.resolve; a recorded run was checked when it trained,
    and records its resolved pooling). --pooling auto without the store's check: pairs where the manifest has a
    pair column."""
    if cfg.pooling == "auto" and not_pairs is None:
        not_pairs = single_texts(manifest)
    side = SideConfig.resolve(cfg, int(manifest["task"]["num_labels"]), manifest["layers"], not_pairs=not_pairs)
    return LadderSideNetwork(backbone_config(manifest), side)


def single_texts(manifest: dict[str, Any]) -> str | None:
    """Why a store is not one of sentence pairs, from its manifest alone (None: it has a pair column)."""
    if not (manifest.get("dataset") or {}).get("columns", {}).get("pair"):
        return "a store of single texts (extracted without a pair column)"
    return None


def not_pairs(store: StoreReader, split: str) -> str | None:
    """What the store is when it is not one of sentence pairs with marked segments (None when it is)."""
    if single_texts(store.manifest):
        return single_texts(store.manifest)
    if not store.split(split).token_type_ids.any():
        return "a pair store whose tokenizer gives no token types (all 0)"
    return None


def init_model(cfg: TrainConfig, store: StoreReader, device: torch.device) -> LadderSideNetwork:
    """The side network on `device`, its blocks Fisher-pruned from the backbone's with --init pruned."""
    pairs_check = not_pairs(store, cfg.train_split) if cfg.pooling in ("pair", "auto") else None
    model = build_model(cfg, store.manifest, pairs_check).to(device)
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


def model_inputs(b) -> tuple:
    """What the side network reads from a batch: the states and mask, and the token types (--pooling pair)."""
    return b.hidden, b.mask, None, b.token_type_ids


def encoder_recipe(cfg: TrainConfig, store: StoreReader, device: torch.device, eval_name: str | None) -> Recipe:
    manifest = store.manifest
    task, num_labels = manifest["task"]["type"], manifest["task"]["num_labels"]
    metric = select_metric(cfg, manifest, task)
    model = init_model(cfg, store, device)
    batches = sources(cfg, store, device)

    def predict(name: str, amp) -> np.ndarray:
        return predict_split(model, batches[name], store.split(name), cfg.batch_size, task, device, amp,
                             inputs=model_inputs)

    resolved = resolved_config(cfg, manifest, metric, eval_name, layers=model.kept_layers, pooling=model.pooling)
    return Recipe(model, batches, task, metric, num_labels, resolved,
                  lambda forward, b: loss(task, forward(*model_inputs(b)), b.labels, cfg.label_smoothing), predict)
