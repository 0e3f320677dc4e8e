"""The Recipe of a decoder target store (featcache/kinds/decoder/targets.py): the causal side network through the
frozen LM head (lm_model.py), batches of prompt + target rows (data.py), the cross-entropy of the target tokens,
and predictions from the cache:

    labels   the candidate label whose text has the highest summed log-probability after the prompt
    text     1 where teacher-forced greedy decoding reproduces the whole target (EOS included), else 0; the
             split's labels are all 1, so accuracy is the exact-match rate that live greedy generation would give
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from featcache.errors import StoreError, TrainConfigError, expected
from featcache.kinds.decoder.backbone import load_causal_backbone
from featcache.kinds.decoder.lm_head import HEAD, NORM_EPS, NORM_WEIGHT
from featcache.reader import SplitReader, StoreReader
from featcache.store import check_match

from ...data import length_bucketed_batches
from ...networks.side_config import SideConfig
from ...recipe import (
    RUN_MANIFEST_KEYS,
    Recipe,
    backbone_config,
    labelled_splits,
    resolved_config,
    select_metric,
)
from .data import CachedTargets, OnlineTargets, TargetSplit
from .lm_model import CausalLMSideNetwork, target_argmax, target_log_probs, target_loss

if TYPE_CHECKING:
    from ...config import TrainConfig

LABELS = "labels"  # the target modes of featcache/kinds/decoder/targets.py
POOLED = "every target token"  # RUN/config.json `side_pooling`: what the side network is read at


def targets_of(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """manifest["decoder"]["targets"]: how a store (or a run's recorded store) trains through the LM head."""
    return (manifest.get("decoder") or {}).get("targets")


def store_top(store: StoreReader) -> dict[str, torch.Tensor]:
    """The frozen final norm and LM head the store keeps."""
    weights = store.frozen_weights()
    missing = [k for k in (HEAD, NORM_WEIGHT, NORM_EPS) if k not in weights]
    if missing:
        raise StoreError(expected("the frozen final norm and LM head in a decoder target store",
                                  f"none of {missing}", "Re-extract the store with this lst."))
    return {k: torch.from_numpy(v) for k, v in weights.items()}


def build_lm_model(cfg: TrainConfig, manifest: dict[str, Any], weights: dict[str, torch.Tensor]) -> CausalLMSideNetwork:
    """The network `cfg` trains, or a run's (its options as recorded); `weights`: the frozen top's arrays."""
    side = SideConfig.resolve(cfg, 1, manifest["layers"])
    return CausalLMSideNetwork(backbone_config(manifest), side, weights)


def check_options(cfg: TrainConfig, targets: dict[str, Any]) -> None:
    if cfg.label_smoothing:
        raise TrainConfigError(expected("--label-smoothing 0 for targets through the LM head (the loss is the "
                                        "target tokens' cross-entropy)", cfg.label_smoothing))
    if targets["mode"] == LABELS and cfg.train_split != targets["train_split"]:
        raise TrainConfigError(expected(f"--train-split {targets['train_split']} (the split whose gold targets "
                                        "were stored; the others hold every candidate)", cfg.train_split))


def sources(cfg: TrainConfig, store: StoreReader, device: torch.device, part: str) -> dict[str, Any]:
    names = labelled_splits(store)
    tgts = {n: TargetSplit(store.split(n), part) for n in names}
    if not cfg.online:
        return {n: CachedTargets(store.split(n), tgts[n], cfg.preload, cfg.memory_budget) for n in names}
    manifest = store.manifest
    backbone = load_causal_backbone(manifest["backbone"]["name"], "fp32", str(device))
    check_match("backbone weights", manifest["backbone"]["revision"], backbone.revision)
    return {n: OnlineTargets(store.split(n), tgts[n], backbone, manifest) for n in names}


@torch.no_grad()
def predict_split(model: CausalLMSideNetwork, source, split: SplitReader, rows_per_batch: int, mode: str,
                  device: torch.device) -> np.ndarray:
    """Every example's prediction from the cache, in the split's order (the module docstring)."""
    model.eval()
    out = np.zeros(len(split), dtype=np.int64)
    per_example = source.targets.per_example
    examples = max(1, rows_per_batch // per_example)
    for idx in length_bucketed_batches(split.lengths, examples, seed=0, epoch=0, shuffle=False):
        b = source(idx).to(device)
        x = model(b.hidden, b.mask, b.at)
        row_of = b.at.nonzero()[:, 0]  # the row of each read position
        if mode == LABELS:
            scores = torch.zeros(len(b.row_example), device=x.device).index_add_(
                0, row_of, target_log_probs(x, model.frozen, b.next))
            out[idx] = scores.view(len(idx), -1).argmax(-1).cpu().numpy()
        else:
            wrong = torch.zeros(len(b.row_example), device=x.device).index_add_(
                0, row_of, (target_argmax(x, model.frozen) != b.next).float())
            out[idx] = (wrong == 0).long().cpu().numpy()
    return out


def lm_recipe(cfg: TrainConfig, store: StoreReader, device: torch.device, eval_name: str | None) -> Recipe:
    """Through the LM head: the network, cached or live batches, the target loss, predictions from the cache."""
    manifest = store.manifest
    targets = targets_of(manifest)
    check_options(cfg, targets)
    metric = select_metric(cfg, manifest, "classification")
    model = build_lm_model(cfg, manifest, store_top(store)).to(device)
    batches = sources(cfg, store, device, targets["part"])
    num_labels = int(manifest["task"]["num_labels"])

    def loss(forward, b) -> torch.Tensor:
        return target_loss(forward(b.hidden, b.mask, b.at), model.frozen, b.next)

    def predict(name: str, amp) -> np.ndarray:
        with amp or contextlib.nullcontext():
            return predict_split(model, batches[name], store.split(name), cfg.batch_size * 2, targets["mode"],
                                 device)

    resolved = resolved_config(cfg, manifest, metric, eval_name, (*RUN_MANIFEST_KEYS, "decoder"),
                               layers=model.kept_layers, side_pooling=POOLED)
    return Recipe(model, batches, "classification", metric, num_labels, resolved, loss, predict)
