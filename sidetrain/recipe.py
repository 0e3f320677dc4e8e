"""What a store kind hands the shared training loop (`Recipe`), and the helpers every kind's recipe uses.

Kinds import this module; it imports no kind, and neither does the loop in train.py that consumes a
Recipe (train.py -> kinds -> recipe.py, never kinds -> train.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from featcache.errors import StoreError, TrainConfigError, expected
from featcache.reader import SplitReader, StoreReader

from . import metrics as M
from .data import CachedBatches, DeviceBatches, fits_on_device, iterate, length_bucketed_batches
from .networks.ladders import stored_blocks

if TYPE_CHECKING:
    from .config import TrainConfig

EVAL_SPLIT_NAMES = ("dev", "validation", "valid", "val")
# Manifest fields every run records in RUN/config.json (what `lst predict` rebuilds the run from).
RUN_MANIFEST_KEYS = ("backbone", "tokenizer", "layers", "task", "max_length", "store_dtype", "precision",
                     "hidden_size")


@dataclass
class Recipe:
    """What the training loop needs from one kind of store. The loop itself (steps, schedule,
    checkpoints, selection, run files) is shared (train.py)."""

    model: torch.nn.Module
    sources: dict[str, Any]  # labelled split -> batch source: a callable on example indices
    task: str  # classification | regression: which metrics apply
    metric: str  # the one the best epoch is picked on
    num_labels: int
    resolved: dict[str, Any]  # the options as run: RUN/config.json, and what a resume must match
    loss: Callable[[Callable, Any], torch.Tensor]  # (forward, batch on the device) -> scalar loss
    predict: Callable[[str, Any], np.ndarray]  # (split name, autocast) -> predictions in the split's order
    # (split name, predictions) -> metrics, where they are not M.compute's on the split's labels (generated text)
    scores: Callable[[str, np.ndarray], dict[str, float]] | None = None

    def score(self, store: StoreReader, name: str, pred: np.ndarray) -> dict[str, float]:
        """Every metric of one split's predictions."""
        if self.scores is not None:
            return self.scores(name, pred)
        return M.compute(self.task, pred, store.split(name).labels, self.num_labels)


def backbone_config(manifest: dict[str, Any]):
    """The backbone's transformers config, rebuilt from the manifest (no download)."""
    from transformers import AutoConfig

    cfg = dict(manifest["backbone"]["config"])
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def pick_eval_split(store: StoreReader, asked: str | None, train_split: str) -> str | None:
    if asked is not None:
        store.split(asked)  # raises with the list of splits if absent
        return asked
    return next((s for s in EVAL_SPLIT_NAMES if s in store.split_names and s != train_split), None)


def check_labels(store: StoreReader, split_name: str) -> SplitReader:
    split = store.split(split_name)
    if split.labels is None:
        raise StoreError(expected(f"labels in split '{split_name}' to train on", "a split without labels",
                                  "Re-extract with --label-column, or pick a labelled --train-split."))
    return split


def labelled_splits(store: StoreReader) -> list[str]:
    return [n for n in store.split_names if store.split(n).labels is not None]


def evaluate_splits(store: StoreReader, names: list[str], train_split: str, task: str, num_labels: int,
                    predict: Callable[[str], np.ndarray],
                    scores: Callable[[str, np.ndarray], dict[str, float]] | None = None,
                    ) -> tuple[dict[str, dict[str, float]], dict[str, list]]:
    """Scores and predictions of every split in `names` but the training one: metrics.json's `splits`
    and predictions.json, for every trainer."""
    results, predictions = {}, {}
    for name in names:
        if name == train_split:
            continue
        pred = predict(name)
        predictions[name] = pred.tolist()
        results[name] = scores(name, pred) if scores else M.compute(task, pred, store.split(name).labels, num_labels)
    return results, predictions


def select_metric(cfg: TrainConfig, manifest: dict[str, Any], task: str) -> str:
    """--metric, or the default for the dataset the store was extracted from (CoLA: Matthews, MRPC: F1)."""
    metric = cfg.metric or M.default_metric(manifest)
    if metric not in (M.REGRESSION if task == "regression" else M.CLASSIFICATION):
        raise TrainConfigError(expected(f"a --metric for a {task} task", metric,
                                        f"Use one of {sorted(M.REGRESSION if task == 'regression' else M.CLASSIFICATION)}."))
    return metric


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast when asked (or on CUDA with --amp auto); a no-op context otherwise."""
    on = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def resolved_config(cfg: TrainConfig, manifest: dict[str, Any], metric: str, eval_split: str | None,
                    manifest_keys: tuple[str, ...] = RUN_MANIFEST_KEYS, *, layers: list[int] | None = None,
                    pooling: str | None = None, **extra: Any) -> dict[str, Any]:
    """RUN/config.json: the options as run (kept layers filled in), the manifest fields the run depends
    on, and whatever a kind adds (`extra`). `layers`: the kept layers the side network was built with
    (SideConfig.kept_layers); a caller without one (the probe) records --layers, or every stored block.
    `pooling`: the side network's pooling as built (--pooling auto resolved by the store), where it depends on it."""
    recorded = {k: manifest[k] for k in manifest_keys}
    if "kind" in manifest:  # `lst predict` finds the run's plug-in by it (older stores: by their shape)
        recorded["kind"] = manifest["kind"]
    if manifest.get("compression"):  # the side network learnt on states rebuilt on these bases (K, checksums)
        recorded["compression"] = manifest["compression"]
    resolved = asdict(cfg)
    resolved.update(metric=metric, eval_split=eval_split,
                    layers=list(layers) if layers is not None
                    else cfg.layers if cfg.layers is not None else stored_blocks(manifest["layers"]),
                    store_manifest=recorded)
    if pooling is not None:
        resolved["pooling"] = pooling
    resolved.update(extra)
    return resolved


def loss(task: str, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """MSE for regression, cross-entropy (with --label-smoothing) for classification."""
    logits = logits.float()
    if task == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


@torch.no_grad()
def predict_split(model: torch.nn.Module, source, split: SplitReader, batch_size: int, task: str,
                  device: torch.device, amp=None, inputs=None) -> np.ndarray:
    """Predictions for every example of a split, in the split's order (`inputs`: what the model reads from a
    batch; default its states and mask)."""
    model.eval()
    batches = length_bucketed_batches(split.lengths, batch_size * 2, seed=0, epoch=0, shuffle=False)
    out = np.zeros(len(split), dtype=np.float32 if task == "regression" else np.int64)
    for idx, b in zip(batches, iterate(source, batches, device)):
        with amp or contextlib.nullcontext():
            logits = (model(*inputs(b)) if inputs else model(b.hidden, b.mask)).float()
        out[idx] = (logits.squeeze(-1) if task == "regression" else logits.argmax(-1)).cpu().numpy()
    return out


def cached_source(split: SplitReader, cfg: TrainConfig, device: torch.device):
    """A GPU keeps a split in its own memory when it fits --memory-budget (unless --no-preload); otherwise the
    host reads it memory-mapped, from RAM (--preload) or streamed (sidetrain.data.host_policy)."""
    if cfg.preload is not False and fits_on_device(split, device, cfg.memory_budget):
        return DeviceBatches(split, None, device)
    return CachedBatches(split, None, cfg.preload, memory_budget=cfg.memory_budget)
