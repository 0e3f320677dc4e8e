"""Stage 2: train an LST side network from a feature store (or, for comparison, with the backbone live).

One loop for every kind of store (`train`): AdamW with warm-up and linear decay, clipping, bf16
autocast, a checkpoint each epoch (a killed run resumes), the best epoch picked on the eval split,
the run folder. What differs per kind of store (side network, batches, loss, predictions) comes in a
`Recipe`: the encoder-only one below, the T5 one from `seq2seq/train.py`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from featcache.backbone import load_backbone, resolve_device
from featcache.errors import StoreError, TrainConfigError, expected
from featcache.progress import progress_bar
from featcache.reader import SplitReader, StoreReader, open_store
from featcache.store import check_match

from . import metrics as M
from .config import TrainConfig
from .data import (
    CachedBatches,
    DeviceBatches,
    OnlineBatches,
    batch_stream,
    fits_on_device,
    iterate,
    length_bucketed_batches,
)
from .kinds.encoder.model import LadderSideNetwork
from .memory import PeakMemory
from .run_files import write_run

log = logging.getLogger(__name__)
EVAL_SPLIT_NAMES = ("dev", "validation", "valid", "val")
CHECKPOINT = "checkpoint.pt"
# Options that change where/how a run executes but not its result: a resumed run may differ in them.
RESUME_FREE = {"out", "device", "preload", "prefetch", "resume", "compile"}


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
                             cfg.reduction_factor, cfg.dropout, cfg.attention_dropout, cfg.pooling, cfg.side_heads)


def _loss(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if task == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast when asked (or on CUDA with --amp auto); a no-op context otherwise."""
    on = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


@torch.no_grad()
def predict_split(model: LadderSideNetwork, source, split: SplitReader, batch_size: int, task: str,
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


def check_labels(store: StoreReader, split_name: str) -> SplitReader:
    split = store.split(split_name)
    if split.labels is None:
        raise StoreError(expected(f"labels in split '{split_name}' to train on", "a split without labels",
                                  "Re-extract with --label-column, or pick a labelled --train-split."))
    return split


@dataclass
class Recipe:
    """What the training loop needs from one kind of store: the encoder-only one here, T5's in
    seq2seq/train.py. The loop itself (steps, schedule, checkpoints, selection, run files) is shared."""

    model: torch.nn.Module
    sources: dict[str, Any]  # labelled split -> batch source: a callable on example indices
    task: str  # classification | regression: which metrics apply
    metric: str  # the one the best epoch is picked on
    num_labels: int
    resolved: dict[str, Any]  # the options as run: RUN/config.json, and what a resume must match
    loss: Callable[[Callable, Any], torch.Tensor]  # (forward, batch on the device) -> scalar loss
    predict: Callable[[str, Any], np.ndarray]  # (split name, autocast) -> predictions in the split's order


def encoder_recipe(cfg: TrainConfig, store: StoreReader, device: torch.device, eval_name: str | None) -> Recipe:
    manifest = store.manifest
    task, num_labels = manifest["task"]["type"], manifest["task"]["num_labels"]
    metric = cfg.metric or M.default_metric(manifest)
    if (metric in M.REGRESSION) != (task == "regression"):
        raise TrainConfigError(expected(f"a --metric for a {task} task", metric,
                                        f"Use one of {sorted(M.REGRESSION if task == 'regression' else M.CLASSIFICATION)}."))
    model = build_model(cfg, manifest).to(device)
    if cfg.init == "pruned":  # side blocks = backbone blocks pruned to 1/r by Fisher information (cached)
        from .kinds.encoder.prune import init_from_backbone

        init_from_backbone(model, store, cfg.train_split, str(device))
    sources = _sources(cfg, store, manifest, device)

    def predict(name: str, amp) -> np.ndarray:
        return predict_split(model, sources[name], store.split(name), cfg.batch_size, task, device, amp)

    return Recipe(model, sources, task, metric, num_labels, _resolved(cfg, manifest, metric, eval_name),
                  lambda forward, b: _loss(task, forward(b.hidden, b.mask), b.labels), predict)


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
    if cfg.head == "probe" and "seq2seq" not in store.manifest:
        from .probe import train_probe

        return train_probe(cfg, store)
    train_split = check_labels(store, cfg.train_split)
    eval_name = pick_eval_split(store, cfg.eval_split, cfg.train_split)
    if "seq2seq" in store.manifest:  # encoder-decoder store (T5): its own side network, batches and scoring
        from .kinds.seq2seq.recipe import seq2seq_recipe

        recipe = seq2seq_recipe(cfg, store, device, eval_name)
    else:
        recipe = encoder_recipe(cfg, store, device, eval_name)
    model, sources, metric = recipe.model, recipe.sources, recipe.metric
    amp = autocast(cfg, device)
    forward = torch.compile(model, dynamic=True) if cfg.compile else model

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = -(-len(train_split) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else min(500, total // 10)
    params = [p for p in model.parameters() if p.requires_grad]  # frozen: side embeddings, T5's LM head
    # fused: one kernel per parameter instead of ~10 per parameter (~100 small tensors: CPU step time)
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))

    state = {"epoch": 0, "step": 0, "best": -np.inf, "best_state": None, "history": [], "losses": [],
             "train_seconds": 0.0, "wait_seconds": 0.0}
    if cfg.resume and (out / CHECKPOINT).exists():
        state = _load_checkpoint(out / CHECKPOINT, recipe.resolved, model, optim, sched)
    (out / "config.json").write_text(json.dumps(recipe.resolved, indent=2, sort_keys=True))
    with PeakMemory(device) as mem, progress_bar("train", total, unit="step") as bar:
        bar.advance(state["step"])
        for epoch in range(state["epoch"], cfg.epochs):
            if state["step"] >= total:
                break
            model.train()
            t0 = time.perf_counter()
            batches = length_bucketed_batches(train_split.lengths, cfg.batch_size, cfg.seed, epoch)
            source = sources[cfg.train_split]
            stream = batch_stream(source, batches, device, _prefetch(cfg, source, device))
            try:
                for b in stream:
                    with amp:
                        loss = recipe.loss(forward, b)
                    optim.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
                    optim.step()
                    sched.step()
                    state["losses"].append(loss.item())
                    state["step"] += 1
                    bar.advance()
                    if state["step"] >= total:
                        break
            finally:
                stream.close()
            seconds = time.perf_counter() - t0
            state["train_seconds"] += seconds
            state["wait_seconds"] += stream.wait_seconds
            record = {"epoch": epoch + 1, "step": state["step"], "seconds": seconds,
                      "data_wait_fraction": stream.wait_seconds / max(seconds, 1e-9),
                      "train_loss": float(np.mean(state["losses"][-len(batches):]))}
            if eval_name:
                scores = _scores(recipe, eval_name, recipe.predict(eval_name, amp), store)
                record.update({f"eval_{k}": v for k, v in scores.items()})
                if scores[metric] > state["best"]:
                    state["best"] = scores[metric]
                    state["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            state["history"].append(record)
            state["epoch"] = epoch + 1
            _save_checkpoint(out / CHECKPOINT, state, recipe.resolved, model, optim, sched)
            if on_epoch is not None:
                on_epoch(epoch + 1, record)
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) if isinstance(v, float) else v
                                                 for k, v in record.items()})
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    results, predictions = {}, {}
    for name in sources:
        if name == cfg.train_split:
            continue
        pred = recipe.predict(name, amp)
        predictions[name] = pred.tolist()
        results[name] = _scores(recipe, name, pred, store)
    step, history, best = state["step"], state["history"], state["best"]
    examples = len(train_split) * len(history) if not cfg.max_steps else step * cfg.batch_size
    seconds = state["train_seconds"]
    summary = {"metric": metric, "eval_split": eval_name, "best_eval": None if best == -np.inf else best,
               "splits": results, "history": history, "steps": step, "train_seconds": seconds,
               "seconds_per_epoch": seconds / max(1, len(history)),
               "examples_per_second": examples / max(seconds, 1e-9),
               "data_wait_fraction": state["wait_seconds"] / max(seconds, 1e-9),
               "peak_memory_bytes": mem.peak_bytes, "peak_memory_kind": mem.kind,
               "mode": "online" if cfg.online else "cached", "head": "lst",
               "trainable_parameters": sum(p.numel() for p in params)}
    write_run(out, model, summary, predictions, state["losses"])
    return summary


def _scores(recipe: Recipe, name: str, pred: np.ndarray, store: StoreReader) -> dict[str, float]:
    return M.compute(recipe.task, pred, store.split(name).labels, recipe.num_labels)


def _prefetch(cfg: TrainConfig, source, device: torch.device) -> bool:
    """A reader thread pays off when it hides disk reads or host-to-GPU copies. A batch gathered from
    RAM on a CPU takes a few ms, and a second thread there slows torch's own threads more (measured:
    113 vs 70 ms per MiniLM side step on 2 cores)."""
    if cfg.online or getattr(source, "on_device", False):
        return False
    if cfg.prefetch is not None:
        return cfg.prefetch
    return device.type != "cpu" or not getattr(source, "preloaded", False)


def _identity(resolved: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resolved.items() if k not in RESUME_FREE}


def _save_checkpoint(path: Path, state: dict[str, Any], resolved: dict[str, Any], model, optim, sched) -> None:
    """Everything needed to continue after the last finished epoch; written whole, then renamed (atomic)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"state": state, "config": json.loads(json.dumps(_identity(resolved))), "model": model.state_dict(),
                "optim": optim.state_dict(), "sched": sched.state_dict(), "rng": torch.get_rng_state()}, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path, resolved: dict[str, Any], model, optim, sched) -> dict[str, Any]:
    ckpt = torch.load(path, weights_only=False)
    mine = json.loads(json.dumps(_identity(resolved)))
    if ckpt["config"] != mine:
        diff = sorted(k for k in set(mine) | set(ckpt["config"]) if mine.get(k) != ckpt["config"].get(k))
        raise TrainConfigError(expected(f"the options of the run being resumed in '{path.parent}'",
                                        f"different {', '.join(diff)}",
                                        "Use a new --out, or --no-resume to start over in this one."))
    model.load_state_dict(ckpt["model"])
    optim.load_state_dict(ckpt["optim"])
    sched.load_state_dict(ckpt["sched"])
    torch.set_rng_state(ckpt["rng"])
    log.info("resuming %s after epoch %d (step %d)", path.parent, ckpt["state"]["epoch"], ckpt["state"]["step"])
    return ckpt["state"]


def _sources(cfg: TrainConfig, store: StoreReader, manifest: dict[str, Any], device: torch.device,
             model: LadderSideNetwork | None = None) -> dict[str, Any]:
    """One batch source per labelled split: the store, or the live backbone for --online."""
    names = [n for n in store.split_names if store.split(n).labels is not None]
    if not cfg.online:
        return {n: _cached(store.split(n), cfg, device) for n in names}
    backbone = load_backbone(manifest["backbone"]["name"], "fp32", str(device))
    check_match("backbone weights", manifest["backbone"]["revision"], backbone.revision)
    return {n: OnlineBatches(store.split(n), backbone, manifest["layers"]) for n in names}


def _cached(split: SplitReader, cfg: TrainConfig, device: torch.device):
    """A GPU keeps a split in its own memory when it fits (unless --no-preload); otherwise RAM or streaming."""
    if cfg.preload is not False and fits_on_device(split, device):
        return DeviceBatches(split, None, device)
    return CachedBatches(split, None, cfg.preload)


def _resolved(cfg: TrainConfig, manifest: dict[str, Any], metric: str, eval_split: str | None) -> dict[str, Any]:
    resolved = asdict(cfg)
    resolved.update(metric=metric, eval_split=eval_split,
                    layers=cfg.layers if cfg.layers is not None else [x for x in manifest["layers"] if x > 0],
                    store_manifest={k: manifest[k] for k in ("backbone", "tokenizer", "layers", "task", "max_length",
                                                             "store_dtype", "precision", "hidden_size")})
    return resolved
