"""The decoder-only store's Recipe for the shared training loop: the causal side network (model.py), batches from
the store (or the live causal backbone for --online), cross-entropy or MSE on the last real token's output. A
target store trains through the frozen LM head instead (lm_recipe.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from featcache.errors import TrainConfigError, expected
from featcache.kinds.decoder.backbone import load_causal_backbone
from featcache.reader import StoreReader
from featcache.store import check_match

from ...data import OnlineBatches
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
from .lm_recipe import lm_recipe, targets_of
from .model import CausalSideNetwork

if TYPE_CHECKING:
    from ...config import TrainConfig

POOLED = "last"  # the token a decoder run classifies from (RUN/config.json `side_pooling`)


def check_options(cfg: TrainConfig) -> None:
    """What the decoder kind does not build yet, refused in one line each."""
    if cfg.init != "random":
        raise TrainConfigError(expected("--init random for a decoder-only store", f"--init {cfg.init}",
                                        "Pruned side blocks are built for encoder and T5 backbones only."))
    if cfg.pooling not in ("auto", "mean"):  # the TrainConfig default; a causal side network reads the last token
        raise TrainConfigError(expected("the default --pooling for a decoder-only store (the side network reads "
                                        "the last real token, which alone has seen the whole text)",
                                        f"--pooling {cfg.pooling}", "Drop --pooling."))


def build_model(cfg: TrainConfig, manifest: dict[str, Any]) -> CausalSideNetwork:
    side = SideConfig.resolve(cfg, int(manifest["task"]["num_labels"]), manifest["layers"])
    return CausalSideNetwork(backbone_config(manifest), side)


def sources(cfg: TrainConfig, store: StoreReader, device: torch.device) -> dict[str, Any]:
    """One batch source per labelled split: the store, or the live causal backbone for --online."""
    names = labelled_splits(store)
    if not cfg.online:
        return {n: cached_source(store.split(n), cfg, device) for n in names}
    manifest = store.manifest
    backbone = load_causal_backbone(manifest["backbone"]["name"], "fp32", str(device))
    check_match("backbone weights", manifest["backbone"]["revision"], backbone.revision)
    return {n: OnlineBatches(store.split(n), backbone, manifest["layers"]) for n in names}


def decoder_recipe(cfg: TrainConfig, store: StoreReader, device: torch.device, eval_name: str | None) -> Recipe:
    check_options(cfg)
    manifest = store.manifest
    if targets_of(manifest):  # a target store: through the frozen LM head
        return lm_recipe(cfg, store, device, eval_name)
    task, num_labels = manifest["task"]["type"], manifest["task"]["num_labels"]
    metric = select_metric(cfg, manifest, task)
    model = build_model(cfg, manifest).to(device)
    batches = sources(cfg, store, device)

    def predict(name: str, amp) -> np.ndarray:
        return predict_split(model, batches[name], store.split(name), cfg.batch_size, task, device, amp)

    resolved = resolved_config(cfg, manifest, metric, eval_name, layers=model.kept_layers, side_pooling=POOLED)
    return Recipe(model, batches, task, metric, num_labels, resolved,
                  lambda forward, b: loss(task, forward(b.hidden, b.mask), b.labels, cfg.label_smoothing), predict)
