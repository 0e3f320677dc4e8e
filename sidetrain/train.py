"""Stage 2: train an LST side network from a feature store (or, for comparison, with the backbone live)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from featcache.backbone import load_backbone, resolve_device
from featcache.errors import StoreError, TrainConfigError, expected
from featcache.progress import progress_bar
from featcache.reader import SplitReader, StoreReader, open_store
from featcache.store import check_match

from . import metrics as M
from .data import CachedBatches, OnlineBatches, iterate, length_bucketed_batches
from .memory import PeakMemory
from .model import LadderSideNetwork

log = logging.getLogger(__name__)
EVAL_SPLIT_NAMES = ("dev", "validation", "valid", "val")


@dataclass
class TrainConfig:
    """Options of `lst train`; the resolved copy is written to RUN/config.json."""

    store: str
    out: str
    reduction_factor: int = 8
    layers: list[int] | None = None  # kept ladders (hidden_states indices >= 1); None = every stored block
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_steps: int = -1  # -1: the paper's 500, scaled down to 10% of the steps on small data
    grad_clip: float = 1.0
    dropout: float = 0.1
    attention_dropout: float = 0.0
    pooling: str = "mean"
    seed: int = 0
    device: str = "auto"
    train_split: str = "train"
    eval_split: str | None = None  # None: the first of dev/validation/valid/val in the store
    metric: str | None = None
    online: bool = False
    preload: bool = True
    max_steps: int = 0  # 0: no limit (tests use it to pin short runs)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for flag, value, low in [("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                                 ("--reduction-factor", self.reduction_factor, 1)]:
            if value < low:
                raise TrainConfigError(expected(f"{flag} of at least {low}", value))
        if self.lr <= 0:
            raise TrainConfigError(expected("--lr above 0", self.lr))
        if self.pooling not in ("mean", "cls"):
            raise TrainConfigError(expected("--pooling mean or cls", self.pooling))
        if self.metric is not None and self.metric not in M.METRICS:
            raise TrainConfigError(expected(f"--metric one of {sorted(M.METRICS)}", self.metric))


def backbone_config(manifest: dict[str, Any]):
    from transformers import AutoConfig

    cfg = dict(manifest["backbone"]["config"])
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def pick_eval_split(store: StoreReader, asked: str | None, train_split: str) -> str | None:
    if asked is not None:
        store.split(asked)  # raises with the list of splits if absent
        return asked
    return next((s for s in EVAL_SPLIT_NAMES if s in store.split_names and s != train_split), None)


def build_model(cfg: TrainConfig, manifest: dict[str, Any]) -> LadderSideNetwork:
    stored = manifest["layers"]
    kept = cfg.layers if cfg.layers is not None else [x for x in stored if x > 0]
    return LadderSideNetwork(backbone_config(manifest), manifest["task"]["num_labels"], stored, kept,
                             cfg.reduction_factor, cfg.dropout, cfg.attention_dropout, cfg.pooling)


def _loss(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if task == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def predict_split(model: LadderSideNetwork, source, split: SplitReader, batch_size: int, task: str,
                  device: torch.device) -> np.ndarray:
    """Predictions for every example of a split, in the split's order."""
    model.eval()
    batches = length_bucketed_batches(split.lengths, batch_size * 2, seed=0, epoch=0, shuffle=False)
    out = np.zeros(len(split), dtype=np.float32 if task == "regression" else np.int64)
    for idx, b in zip(batches, iterate(source, batches, device)):
        logits = model(b.hidden, b.mask)
        out[idx] = (logits.squeeze(-1) if task == "regression" else logits.argmax(-1)).cpu().numpy()
    return out


def train(cfg: TrainConfig, store: StoreReader | None = None,
          on_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train, select the best epoch on the eval split, evaluate every labelled split, write RUN/.

    `store`: an already opened store whose loaded splits are reused (a search opens it once).
    `on_epoch(epoch, record)`: called after each epoch's evaluation (a search reports and prunes
    there; raising stops the run).
    """
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    store = store or open_store(cfg.store)
    manifest = store.manifest
    if "seq2seq" in manifest:  # encoder-decoder store (T5): its own side network and loop
        from .seq2seq_train import train_seq2seq

        return train_seq2seq(cfg, store, on_epoch)
    task, num_labels = manifest["task"]["type"], manifest["task"]["num_labels"]
    metric = cfg.metric or M.default_metric(task)
    train_split = store.split(cfg.train_split)
    if train_split.labels is None:
        raise StoreError(f"Split '{cfg.train_split}' of the store has no labels; training needs labels.")
    eval_name = pick_eval_split(store, cfg.eval_split, cfg.train_split)
    model = build_model(cfg, manifest).to(device)
    sources = _sources(cfg, store, manifest, device, model)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(_resolved(cfg, manifest, metric, eval_name), indent=2, sort_keys=True))
    steps_per_epoch = -(-len(train_split) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else min(500, total // 10)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))

    step, best, best_state, history, losses = 0, -np.inf, None, [], []
    train_seconds = 0.0
    with PeakMemory(device) as mem, progress_bar("train", total, unit="step") as bar:
        for epoch in range(cfg.epochs):
            model.train()
            t0 = time.perf_counter()
            batches = length_bucketed_batches(train_split.lengths, cfg.batch_size, cfg.seed, epoch)
            for b in iterate(sources[cfg.train_split], batches, device):
                loss = _loss(task, model(b.hidden, b.mask), b.labels)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optim.step()
                sched.step()
                losses.append(loss.item())
                step += 1
                bar.advance()
                if step >= total:
                    break
            train_seconds += time.perf_counter() - t0
            record = {"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses[-len(batches):]))}
            if eval_name:
                scores = _evaluate(model, sources[eval_name], store.split(eval_name), cfg, task, num_labels, device)
                record.update({f"eval_{k}": v for k, v in scores.items()})
                if scores[metric] > best:
                    best, best_state = scores[metric], {k: v.detach().clone() for k, v in model.state_dict().items()}
            history.append(record)
            if on_epoch is not None:
                on_epoch(epoch + 1, record)
            log.info("epoch %d: %s", epoch + 1, record)
            if step >= total:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    results, predictions = {}, {}
    for name in store.split_names:
        split = store.split(name)
        if name == cfg.train_split or split.labels is None or name not in sources:
            continue
        pred = predict_split(model, sources[name], split, cfg.batch_size, task, device)
        predictions[name] = pred.tolist()
        results[name] = M.compute(task, pred, split.labels, num_labels)
    examples = len(train_split) * len(history) if not cfg.max_steps else step * cfg.batch_size
    summary = {"metric": metric, "eval_split": eval_name, "best_eval": None if best == -np.inf else best,
               "splits": results, "history": history, "steps": step, "train_seconds": train_seconds,
               "examples_per_second": examples / max(train_seconds, 1e-9), "peak_memory_bytes": mem.peak_bytes,
               "peak_memory_kind": mem.kind, "mode": "online" if cfg.online else "cached",
               "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "predictions.json").write_text(json.dumps(predictions))
    (out / "train_log.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n"
                                                 for i, v in enumerate(losses)))
    return summary


def _evaluate(model, source, split: SplitReader, cfg: TrainConfig, task: str, num_labels: int,
              device: torch.device) -> dict[str, float]:
    pred = predict_split(model, source, split, cfg.batch_size, task, device)
    return M.compute(task, pred, split.labels, num_labels)


def _sources(cfg: TrainConfig, store: StoreReader, manifest: dict[str, Any], device: torch.device,
             model: LadderSideNetwork) -> dict[str, Any]:
    """One batch source per labelled split: the store, or the live backbone for --online."""
    names = [n for n in store.split_names if store.split(n).labels is not None]
    if not cfg.online:
        return {n: CachedBatches(store.split(n), None, cfg.preload) for n in names}
    backbone = load_backbone(manifest["backbone"]["name"], "fp32", str(device))
    check_match("backbone weights", manifest["backbone"]["revision"], backbone.revision)
    return {n: OnlineBatches(store.split(n), backbone, manifest["layers"]) for n in names}


def _resolved(cfg: TrainConfig, manifest: dict[str, Any], metric: str, eval_split: str | None) -> dict[str, Any]:
    resolved = asdict(cfg)
    resolved.update(metric=metric, eval_split=eval_split,
                    layers=cfg.layers if cfg.layers is not None else [x for x in manifest["layers"] if x > 0],
                    store_manifest={k: manifest[k] for k in ("backbone", "tokenizer", "layers", "task", "max_length",
                                                             "store_dtype", "precision", "hidden_size")})
    return resolved
