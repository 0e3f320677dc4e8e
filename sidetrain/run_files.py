"""The files every training run leaves in its folder, written (and read back) in one place so every
trainer agrees: `lst train` (train.py), the linear probe (probe.py) and stacked trials (search/stacked.py).

    RUN/config.json        the options as run and the store facts the run relied on (recipe.resolved_config)
    RUN/metrics.json       the summary below, the same keys for every trainer
    RUN/model.safetensors  the trained weights (the probe: its linear head and feature standardisation)
    RUN/predictions.json   {split: [prediction per example, in the split's order]} for every labelled
                           split except the training split
    RUN/train_log.jsonl    {"step", "loss"} per optimiser step (the probe: per L2 value fitted; a multi-task
                           run adds "task", the task of the step's batch)
    RUN/tasks/<name>/      a multi-task run (`lst train STORE STORE ...`, multitask.py): each task's own run
                           folder, these same files, its config.json marked with "multitask"; RUN/config.json
                           then lists the tasks under "tasks", RUN/metrics.json adds "tasks" (per task: store,
                           folder, metric, eval_split, best_eval, splits, steps, examples, trainable_parameters,
                           own_parameters), "task_sampling" and "shared_parameters", its metric is "task_mean"
                           (the mean over the tasks of each one's selection metric), RUN/predictions.json is
                           {task: {split: [...]}} and RUN/model.safetensors holds '<task>/<name>', each shared
                           tensor once

metrics.json (`summary()`):
    metric               the metric the best epoch was picked on
    eval_split           the split it was read on (null: none; then the last epoch is kept)
    best_eval            that metric at the best epoch (null without an eval split)
    splits               {split: {metric: value}} for every labelled split except the training split
    history              one record per epoch (the probe: per L2 value): epoch, step, seconds,
                         data_wait_fraction, train_loss, eval_<metric> for every metric of the eval split,
                         and what a trainer adds (the probe: l2)
    steps                optimiser steps taken
    train_seconds        time in training epochs (evaluation excluded; stacked: shared by K members)
    seconds_per_epoch    train_seconds / epochs run
    examples_per_second  training examples seen per train second
    data_wait_fraction   share of train_seconds spent waiting for batches
    data_wait_seconds    the seconds themselves
    peak_memory_bytes    peak memory while training (peak_memory_kind: which memory, or why not measured;
                         on a CPU anonymous RSS above the level at the first step, "cpu_rss_anon_above_start")
    memory               the run's memory, split (`memory_figures`; null where a trainer does not measure it; a
                         stacked member's is the whole stack's, as its peak is; the probe's model is its linear
                         layer, its optimizer L-BFGS's history, and its data held includes the pooled features):
        model_bytes            parameters + buffers of the side network (frozen ones included), exact
        gradient_bytes         gradients of the trained parameters, exact
        optimizer_bytes        optimizer state (AdamW: two moments and a step per parameter), exact
        best_weights_bytes     the copy of the best epoch's weights kept during training, exact
        data_held_bytes        stored states the batch sources copied into RAM (anonymous), exact
        data_device_bytes      stored states the sources copied to the GPU, exact
        data_mapped_bytes      store bytes read through memory maps (page cache: reclaimable, not held)
        data_tokens_bytes      offsets, token ids and labels every policy keeps in RAM, exact
        data_policy            {split: ram | mmap | stream | device | online}
        activation_bytes       the training loop's peak minus what the rows above account for (CPU:
                               anonymous RSS, so it also holds allocator slack and evaluation buffers)
        process_start_rss_anon_bytes   RssAnon when training began (imports, torch, the opened store)
        peak_rss_anon_bytes    whole-process peak of RssAnon (/proc/self/status, sampled every 10 ms)
        peak_rss_file_bytes    whole-process peak of RssFile (file-backed pages: the mapped store, libraries)
        peak_device_bytes      CUDA max allocated during training (null on a CPU)
    mode                 "cached" (from the store) or "online" (the backbone live)
    head                 "lst" (a side network) or "probe" (the linear probe)
    stacked_with         how many trials trained in one stacked pass (1: alone)
    trainable_parameters parameters the optimiser updated

What may be at an --out (`prepare_run_dir`, for `lst train`, the probe, stacked members and `lst sweep`):
nothing, an empty folder, or a folder lst wrote, recognised by its entries (RUN_NAMES, or SWEEP_NAMES for
a sweep) and, where there is one, by its config.json / sweep.json holding lst's keys. Anything else, a
plain file included, is refused in one line: lst never overwrites or deletes what it did not write.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from featcache.errors import LstError, SweepError, TrainConfigError, expected

from .config import TrainConfig

RUN_FILES = ("config.json", "model.safetensors")  # what a finished run folder holds at least
# Every entry a trainer writes in RUN/ (checkpoint.tmp and config.json.tmp: renamed into place).
RUN_NAMES = frozenset({"config.json", "config.json.tmp", "checkpoint.pt", "checkpoint.tmp", "metrics.json",
                       "model.safetensors", "predictions.json", "train_log.jsonl", "tasks"})
# Every entry `lst sweep` writes in OUT/ (study.db-*: SQLite's journal files; .claim.lock: claims.py).
SWEEP_NAMES = frozenset({"sweep.json", "space.json", "study.db", "study.db-journal", "study.db-wal", "study.db-shm",
                         "trials", "logs", "summary.json", "summary.png", "best", ".claim.lock"})
_RUN_KEYS = {"store", "out", "store_manifest"}  # in every RUN/config.json (recipe.resolved_config)
_SWEEP_KEYS = {"store", "out", "trials", "study_name"}  # in every OUT/sweep.json
_HINT = "Choose another --out; lst never deletes what it did not write."


def _has_keys(path: Path, keys: set[str]) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and keys <= data.keys()


def prepare_run_dir(out: str | Path, kind: str = "run", also: tuple[str, ...] = (), create: bool = True) -> Path:
    """Create --out, or check that what is there is an lst run folder (`kind` "run") or sweep folder
    ("sweep") that may be resumed or trained into again; refuse anything else before a byte is written.
    `also`: further names lst writes there (a sweep's journal storage file inside --out); `create`: False
    to check only (a trainer checks first and creates the folder when it writes config.json)."""
    path = Path(out)
    error = SweepError if kind == "sweep" else TrainConfigError
    what, names, marker, keys = ("a sweep folder", SWEEP_NAMES, "sweep.json", _SWEEP_KEYS) if kind == "sweep" \
        else ("a run folder", RUN_NAMES, "config.json", _RUN_KEYS)
    if path.exists() and not path.is_dir():
        raise error(expected(f"an empty folder or an lst {what[2:]} at --out", f"'{out}', a file", _HINT))
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        foreign = [n for n in entries if n not in names and n not in also]
        if marker in entries and marker not in foreign and not _has_keys(path / marker, keys):
            foreign = sorted([*foreign, marker])
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise error(expected(f"an empty folder or an lst {what[2:]} at --out",
                                 f"'{out}' holding files lst did not write ({shown})", _HINT))
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def summary(*, metric: str, eval_split: str | None, best_eval: float | None, splits: dict[str, dict[str, float]],
            history: list[dict[str, Any]], steps: int, train_seconds: float, examples: int, wait_seconds: float,
            peak_memory_bytes: int, peak_memory_kind: str, mode: str, head: str, trainable_parameters: int,
            stacked_with: int = 1, memory: dict[str, Any] | None = None) -> dict[str, Any]:
    """metrics.json, with the schema above (`examples`: training examples seen; `wait_seconds`: waiting for batches;
    `memory`: `memory_figures(...)`)."""
    return {"metric": metric, "eval_split": eval_split, "best_eval": best_eval, "splits": splits,
            "history": history, "steps": steps, "train_seconds": train_seconds,
            "seconds_per_epoch": train_seconds / max(1, len(history)),
            "examples_per_second": examples / max(train_seconds, 1e-9),
            "data_wait_fraction": wait_seconds / max(train_seconds, 1e-9), "data_wait_seconds": wait_seconds,
            "peak_memory_bytes": peak_memory_bytes, "peak_memory_kind": peak_memory_kind, "mode": mode,
            "head": head, "stacked_with": stacked_with, "trainable_parameters": trainable_parameters,
            "memory": memory}


MEMORY_KEYS = ("model_bytes", "gradient_bytes", "optimizer_bytes", "best_weights_bytes", "data_held_bytes",
               "data_device_bytes", "data_mapped_bytes", "data_tokens_bytes", "data_policy", "activation_bytes",
               "process_start_rss_anon_bytes", "peak_rss_anon_bytes", "peak_rss_file_bytes", "peak_device_bytes")


def memory_figures(**figures: Any) -> dict[str, Any]:
    """metrics.json's `memory` entry: exactly the keys of the schema above, in its order."""
    if set(figures) != set(MEMORY_KEYS):
        raise TypeError(f"memory_figures: expected keys {MEMORY_KEYS}, got {sorted(figures)}")
    return {k: figures[k] for k in MEMORY_KEYS}


def write_config(out: Path, resolved: dict[str, Any]) -> None:
    """RUN/config.json, written whole, then renamed (a kill never leaves a half config that would make the
    folder unrecognisable); checks --out first (`prepare_run_dir`) for trainers that did not."""
    prepare_run_dir(out)
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str))
    tmp.replace(out / "config.json")


def write_run(out: Path, weights: nn.Module | dict[str, torch.Tensor], summary: dict[str, Any],
              predictions: dict[str, Any], losses: list[float], step_tasks: list[str] | None = None) -> None:
    """RUN/model.safetensors, metrics.json, predictions.json and train_log.jsonl (config.json: `write_config`).
    `step_tasks`: a multi-task run's task of each step, logged beside its loss."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "predictions.json").write_text(json.dumps(predictions))
    tasks = step_tasks or [None] * len(losses)
    (out / "train_log.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "loss": v} if task is None else {"step": i + 1, "loss": v, "task": task}) + "\n"
        for i, (v, task) in enumerate(zip(losses, tasks))))


BASES = "bases.safetensors"  # a run on a compressed store: the store's basis per part, for live inference


def write_bases(out: Path, store) -> None:
    """RUN/bases.safetensors: each part's basis (components (n_layers, d, K), mean (n_layers, d)) of a compressed
    store, so the run projects live states as the store holds them without the store. Nothing for a full store."""
    from featcache.manifest import compression_of

    if not compression_of(store.manifest):
        return
    split = store.split(store.split_names[0])
    tensors = {}
    for part in store.manifest.get("parts", {}):
        basis = split.part(part).layer_basis(None)
        if basis is not None:
            tensors[f"{part or 'root'}.components"] = basis.components.contiguous()
            tensors[f"{part or 'root'}.mean"] = basis.mean.contiguous()
    save_file(tensors, str(out / BASES))


def read_bases(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{part ('' for the root part): (components, mean)} from RUN/bases.safetensors; a one-line error when absent."""
    path = Path(folder) / BASES
    if not path.is_file():
        raise LstError(expected(f"{BASES} in a run trained on a compressed store (the basis live states are projected "
                                "onto)", f"'{folder}' without it (trained by an older lst)",
                                "Train it again with this lst."))
    tensors = load_file(str(path))
    parts = {k.rsplit(".", 1)[0] for k in tensors}
    return {("" if p == "root" else p): (tensors[f"{p}.components"], tensors[f"{p}.mean"]) for p in parts}


def read_run_config(run: str | Path) -> dict[str, Any]:
    """RUN/config.json of a finished LST run (the options as run and the store manifest it trained on)."""
    path = Path(run)
    if not all((path / name).is_file() for name in RUN_FILES):
        raise LstError(expected("a finished run folder (config.json and model.safetensors)", f"'{run}'",
                                "Train one with `lst train STORE --out RUN`."))
    config = json.loads((path / "config.json").read_text())
    if isinstance(config.get("tasks"), dict):  # a multi-task run: each task's own folder is a run
        names = sorted(config["tasks"])
        raise LstError(expected("one task's run folder", f"'{run}', a multi-task run (tasks: {', '.join(names)})",
                                f"Use {Path(run) / 'tasks' / names[0]} (`lst predict RUN --task NAME`)."))
    if config.get("head", "lst") != "lst":
        raise TrainConfigError(expected("an LST run for `lst predict`", f"a '{config['head']}' run"))
    return config


def run_options(resolved: dict[str, Any]) -> TrainConfig:
    """The TrainConfig a run was trained with, from its RUN/config.json (the fields it adds beside them dropped)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in resolved.items() if k in names})


def load_run(run: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The run's options and the store manifest it was trained on (RUN/config.json)."""
    resolved = read_run_config(run)
    return run_options(resolved), resolved["store_manifest"]
