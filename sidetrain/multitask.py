"""One side network over several stores: `lst train STORE [STORE ...] --out RUN` (docs/multitask.md).

Each store is a task. Every task's kind builds its own `Recipe` (the same options, its store), and the tasks'
networks are then made one network: a parameter or buffer whose qualified name and shape equal task 0's
becomes task 0's very tensor object (`share_parameters`), so each recipe's loss and predict closures, which
hold their own `model`, train and read the shared weights; where shapes differ (an encoder classifier over
another number of labels) a task keeps its own. The shared loop (train.py) then trains the union, one task per
batch (`epoch_plan`), and picks the best epoch on the mean over the tasks of each task's selection metric.

The run folder holds the whole run (config.json, metrics.json with a `tasks` entry, checkpoint.pt, the
weights once each) and, per task, RUN/tasks/<name>/: a complete single-task run folder, which `lst predict`,
`LadderModel.from_pretrained` and `save_pretrained` read as they read any run.

This module talks to a kind only through `TrainKind.recipe` and the `Recipe` it returns; it never asks which
kind a store is (it compares the kinds' names only to refuse a mix).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featcache.errors import LstError, TrainConfigError, expected
from featcache.reader import SplitReader, StoreReader, open_store

from .config import TrainConfig
from .data import data_figures, length_bucketed_batches
from .kinds.registry import kind_for
from .recipe import Recipe, check_labels, evaluate_splits, pick_eval_split
from .run_files import summary as run_summary
from .run_files import write_bases, write_config, write_run

TASKS_DIR = "tasks"  # RUN/tasks/<name>/: each task's own run folder
SELECTION = "task_mean"  # metrics.json's `metric` of a multi-task run: the mean of the tasks' selection metrics
BACKBONE_KEYS = ("backbone", "image_backbone")  # manifest entries naming a frozen model (name, revision)


@dataclass
class Task:
    """One store of a run and what the loop needs of it (a single-store run is one Task)."""

    name: str
    cfg: TrainConfig  # the run's options, with this task's store and run folder
    store: StoreReader
    train_split: SplitReader
    eval_name: str | None
    recipe: Recipe


def build_task(cfg: TrainConfig, store: StoreReader, device: torch.device, name: str = "") -> Task:
    """The task of one store: its training split, its eval split and its kind's recipe."""
    train_split = check_labels(store, cfg.train_split)
    eval_name = pick_eval_split(store, cfg.eval_split, cfg.train_split)
    recipe = kind_for(store.manifest).recipe(cfg, store, device, eval_name)
    return Task(name, cfg, store, train_split, eval_name, recipe)


# ---------------------------------------------------------------------------------------------- the stores


def task_names(paths: list[str]) -> list[str]:
    """Each store's folder name without '.zarr', made unique ('-2', '-3', ... on a repeat)."""
    names: list[str] = []
    for p in paths:
        base = re.sub(r"\.zarr$", "", Path(str(p).rstrip("/")).name) or "task"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


def _differ(what: str, values: dict[str, Any], hint: str = "") -> None:
    if len({repr(v) for v in values.values()}) > 1:
        raise TrainConfigError(expected(what, ", ".join(f"{n}: {v}" for n, v in values.items()), hint))


def open_stores(cfg: TrainConfig) -> dict[str, StoreReader]:
    """The stores of a multi-task run by task name, or a one-line refusal: a probe, a store given twice, stores of
    different kinds, or of different backbones (name or weights revision in their manifests)."""
    if cfg.head != "lst":
        raise TrainConfigError(expected("--head lst for a multi-task run (several STOREs)", f"--head {cfg.head}",
                                        "Train a probe per store."))
    paths = cfg.stores
    where = [p.rstrip("/") if "://" in p else os.path.realpath(p) for p in paths]
    seen = [p for i, p in enumerate(paths) if where[i] in where[:i]]
    if seen:
        raise TrainConfigError(expected("different stores for a multi-task run", f"'{seen[0]}' a second time"))
    stores = dict(zip(task_names(paths), (open_store(p) for p in paths)))
    _differ("stores of one kind for one multi-task run", {n: kind_for(s.manifest).name for n, s in stores.items()},
            "Train a run per kind.")
    hints = {"name": "Extract every task from the same backbone name or path.",
             "revision": "Extract every task with the same backbone weights."}
    for key in BACKBONE_KEYS:
        if any(key in s.manifest for s in stores.values()):
            for field, hint in hints.items():
                _differ(f"stores of one {key.replace('_', ' ')} for one multi-task run (the same {field} in every "
                        "manifest)", {n: (s.manifest.get(key) or {}).get(field) for n, s in stores.items()}, hint)
    return stores


def build_tasks(cfg: TrainConfig, stores: dict[str, StoreReader], device: torch.device, out: Path) -> list[Task]:
    """One task per store, each recipe's network initialised from --seed as its single-store run would be, then
    shared with task 0's wherever names and shapes agree."""
    tasks = []
    for (name, store), path in zip(stores.items(), cfg.stores):
        task_cfg = dataclasses.replace(cfg, store=path, out=str(out / TASKS_DIR / name))
        torch.manual_seed(cfg.seed)
        tasks.append(build_task(task_cfg, store, device, name))
    _differ("the same kept layers in every task of a multi-task run",
            {t.name: " ".join(f"{k} {v}" for k, v in sorted(t.recipe.resolved.items()) if k.endswith("layers"))
             for t in tasks},
            "Pass --layers with layers that every store holds.")
    share_parameters([t.recipe.model for t in tasks])
    return tasks


# ---------------------------------------------------------------------------------------------- the network


def _slots(model: nn.Module) -> dict[str, tuple[nn.Module, str, str]]:
    """Every parameter and buffer slot of `model`: qualified name -> (owning module, 'parameters' | 'buffers',
    attribute name)."""
    out = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for where in ("parameters", "buffers"):
            for attr, value in getattr(module, f"_{where}").items():
                if value is not None:
                    out[f"{prefix}.{attr}" if prefix else attr] = (module, where, attr)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a task's tensor may become task 0's: the same shape and dtype; a trained parameter is shared
    whatever its start (the run trains one), a frozen one or a buffer only when it holds the same values."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if isinstance(a, nn.Parameter) and a.requires_grad and b.requires_grad:
        return True
    return a.requires_grad == b.requires_grad and bool(torch.equal(a, b))


def share_parameters(models: list[nn.Module]) -> int:
    """Make every model's parameters and buffers that match task 0's (name, shape, dtype; values for frozen ones)
    task 0's very objects, in place. Returns how many slots became shared.

    A network that kept a tensor elsewhere too (a plain attribute, a closure) would go on reading the replaced
    one, untrained: every replaced tensor must be gone afterwards, or the run stops here naming it."""
    first = {name: getattr(module, f"_{where}")[attr] for name, (module, where, attr) in _slots(models[0]).items()}
    replaced: dict[str, weakref.ref] = {}
    for i, model in enumerate(models[1:], 1):
        for name, (module, where, attr) in _slots(model).items():
            mine, theirs = getattr(module, f"_{where}")[attr], first.get(name)
            if mine is not theirs and theirs is not None and type(mine) is type(theirs) and _same(theirs, mine):
                getattr(module, f"_{where}")[attr] = theirs
                replaced[f"task {i}: {name}"] = weakref.ref(mine)
            del mine
    gc.collect()
    if alive := [name for name, ref in replaced.items() if ref() is not None]:
        raise LstError(f"Expected each task's side network to hold its weights only as registered parameters and "
                       f"buffers, so that tasks can share them. Got {alive[0]} still referenced elsewhere after "
                       f"sharing ({len(alive)} in all). Train the stores one at a time.")
    return len(replaced)


def joint_model(tasks: list[Task]) -> nn.Module:
    """What the loop trains and checkpoints: a single task's network, or every task's in one ModuleDict (its
    parameters() yields each shared tensor once)."""
    if len(tasks) == 1:
        return tasks[0].recipe.model
    return nn.ModuleDict({f"task{i}": t.recipe.model for i, t in enumerate(tasks)})


def distinct_weights(tasks: list[Task]) -> dict[str, torch.Tensor]:
    """RUN/model.safetensors of a multi-task run: every task's weights as '<task>/<name>', each shared tensor once
    (under the first task that has it; safetensors stores no aliases)."""
    out, seen = {}, set()
    for t in tasks:
        for key, value in t.recipe.model.state_dict().items():
            ident = (value.data_ptr(), tuple(value.shape), value.stride(), value.dtype)
            if value.numel() and ident in seen:
                continue
            seen.add(ident)
            out[f"{t.name}/{key}"] = value
    return out


def own_parameters(tasks: list[Task]) -> dict[str, int]:
    """Trained parameters of each task that no other task shares."""
    owners: dict[int, set[str]] = {}
    for t in tasks:
        for p in t.recipe.model.parameters():
            if p.requires_grad:
                owners.setdefault(id(p), set()).add(t.name)
    return {t.name: sum(p.numel() for p in t.recipe.model.parameters() if p.requires_grad and owners[id(p)] == {t.name})
            for t in tasks}


# ---------------------------------------------------------------------------------------------- the batches


def epoch_plan(tasks: list[Task], batch_size: int, seed: int, epoch: int, sampling: str) -> list[tuple[int, np.ndarray]]:
    """The epoch's batches in order, each (task index, example indices of that task's training split).

    Each task's batches are length-bucketed and shuffled from (seed + its index, epoch); one task: exactly
    those. Several: interleaved at random from (seed, epoch). proportional: every task's batches once each, so
    a task is drawn in proportion to its size; uniform: the same number of steps in all, each task drawn equally
    often (the remainder to tasks drawn at random), a small task's batches repeated (reshuffled), a large
    task's cut to its share."""
    own = [length_bucketed_batches(t.train_split.lengths, batch_size, seed + i, epoch) for i, t in enumerate(tasks)]
    if len(tasks) == 1:
        return [(0, b) for b in own[0]]
    n, total = len(tasks), sum(len(b) for b in own)
    rng = np.random.default_rng([seed, epoch, n])
    if sampling == "uniform":
        counts = np.full(n, total // n)
        counts[rng.permutation(n)[:total % n]] += 1
    else:
        counts = np.array([len(b) for b in own])
    queues = []
    for batches, count in zip(own, counts):
        queue = list(batches)
        while len(queue) < count:  # uniform: a small task goes round again, in another order
            queue += [batches[j] for j in rng.permutation(len(batches))]
        queues.append(iter(queue[:count]))
    return [(int(k), next(queues[k])) for k in rng.permutation(np.repeat(np.arange(n), counts))]


def data_of(tasks: list[Task]) -> dict[str, Any]:
    """metrics.json's data figures (run_files.memory_figures) over every task's batch sources (policies by
    '<task>/<split>' when there are several)."""
    parts = [data_figures(t.recipe.sources, t.store) for t in tasks]
    if len(parts) == 1:
        return parts[0]
    merged = {k: sum(p[k] for p in parts) for k in parts[0] if k != "data_policy"}
    merged["data_policy"] = {f"{t.name}/{split}": policy for t, p in zip(tasks, parts)
                             for split, policy in p["data_policy"].items()}
    return merged


# ---------------------------------------------------------------------------------------------- selection


def evaluate_epoch(tasks: list[Task], amp, record: dict[str, Any], losses: list[float],
                   steps_of: list[int]) -> float | None:
    """After an epoch of a multi-task run: each task's training loss over the epoch (`losses` and `steps_of`,
    the epoch's steps and their task indices) and eval-split scores into `record['tasks']`; returns the
    selection value, the mean over the tasks that have an eval split of each one's selection metric (None: no
    task has one), also recorded as `eval_task_mean`."""
    record["tasks"], picked = {}, []
    for i, t in enumerate(tasks):
        mine = [v for v, k in zip(losses, steps_of) if k == i]
        entry: dict[str, Any] = {"steps": len(mine), "train_loss": float(np.mean(mine)) if mine else None}
        if t.eval_name:
            scores = t.recipe.score(t.store, t.eval_name, t.recipe.predict(t.eval_name, amp))
            entry.update({f"eval_{k}": v for k, v in scores.items()})
            picked.append(scores[t.recipe.metric])
        record["tasks"][t.name] = entry
    if not picked:
        return None
    record[f"eval_{SELECTION}"] = float(np.mean(picked))
    return record[f"eval_{SELECTION}"]


def run_config(cfg: TrainConfig, tasks: list[Task], free: set[str]) -> dict[str, Any]:
    """RUN/config.json of a multi-task run: the options as run (`store`: the list), `tasks`: per task its store,
    folder and recorded options (`free` ones left out: they follow the run's), and the keys that mark an lst run
    folder (`store_manifest`: per task, in its own folder's config.json)."""
    resolved = dataclasses.asdict(cfg)
    resolved.update(metric=SELECTION, eval_split=_eval_splits(tasks), store_manifest=None,
                    layers=tasks[0].recipe.resolved.get("layers"),
                    tasks={t.name: {"store": t.cfg.store, "folder": f"{TASKS_DIR}/{t.name}",
                                    "config": {k: v for k, v in t.recipe.resolved.items() if k not in free}}
                           for t in tasks})
    return resolved


def _eval_splits(tasks: list[Task]) -> str | None:
    names = sorted({t.eval_name for t in tasks if t.eval_name})
    return ",".join(names) if names else None


# ---------------------------------------------------------------------------------------------- the run folder


def finish(out: Path, cfg: TrainConfig, tasks: list[Task], state: dict[str, Any], amp, common: dict[str, Any],
           memory: Any) -> dict[str, Any]:
    """Evaluate every task's labelled splits with the selected weights, write RUN/tasks/<name>/ (a single-task
    run folder each) and RUN/ (the whole run); return the run's metrics.json.

    `common`: the summary fields every task shares (the loop's timing, memory kind, mode, head); a task's
    `steps` are the steps that trained on its batches (its train_log.jsonl), the run's are all of them;
    `memory`: a callable giving the memory figures, called after the evaluation as a single-store run does."""
    evaluated = [evaluate_splits(t.store, list(t.recipe.sources), t.cfg.train_split, t.recipe.task,
                                 t.recipe.num_labels, lambda name, t=t: t.recipe.predict(name, amp), t.recipe.scores)
                 for t in tasks]
    memory = memory()
    history, best_epoch = state["history"], state.get("best_epoch")
    steps_of, names = state["task_steps"], [t.name for t in tasks]
    own = own_parameters(tasks)
    entries, predictions = {}, {}
    for i, (t, (results, preds)) in enumerate(zip(tasks, evaluated)):
        task_history = [{**{k: v for k, v in h.items() if k not in ("tasks", f"eval_{SELECTION}")},
                         **h["tasks"][t.name]} for h in history]
        best = None if best_epoch is None else history[best_epoch - 1]["tasks"][t.name].get(f"eval_{t.recipe.metric}")
        examples = state["task_examples"][i]
        trainable = sum(p.numel() for p in t.recipe.model.parameters() if p.requires_grad)
        summary = run_summary(metric=t.recipe.metric, eval_split=t.eval_name, best_eval=best, splits=results,
                              history=task_history, steps=steps_of.count(i), examples=examples,
                              trainable_parameters=trainable, memory=memory, **common)
        folder = out / TASKS_DIR / t.name
        write_config(folder, {**t.recipe.resolved, "multitask": {"run": str(out), "tasks": names,
                                                                  "task_sampling": cfg.task_sampling}})
        write_run(folder, t.recipe.model, summary, preds, [v for v, k in zip(state["losses"], steps_of) if k == i])
        write_bases(folder, t.store)
        entries[t.name] = {"store": t.cfg.store, "folder": f"{TASKS_DIR}/{t.name}", "metric": t.recipe.metric,
                           "eval_split": t.eval_name, "best_eval": best, "splits": results,
                           "steps": steps_of.count(i), "examples": examples, "trainable_parameters": trainable,
                           "own_parameters": own[t.name]}
        predictions[t.name] = preds
    splits = sorted({s for e in entries.values() for s in e["splits"]})
    mean = {s: {SELECTION: float(np.mean([e["splits"][s][e["metric"]] for e in entries.values() if s in e["splits"]]))}
            for s in splits}
    params = {id(p): p for t in tasks for p in t.recipe.model.parameters() if p.requires_grad}
    best = None if best_epoch is None else history[best_epoch - 1][f"eval_{SELECTION}"]
    summary = run_summary(metric=SELECTION, eval_split=_eval_splits(tasks), best_eval=best, splits=mean,
                          history=history, steps=state["step"], examples=sum(state["task_examples"]),
                          trainable_parameters=sum(p.numel() for p in params.values()), memory=memory, **common)
    summary.update(tasks=entries, task_sampling=cfg.task_sampling,
                   shared_parameters=sum(p.numel() for p in params.values()) - sum(own.values()))
    write_run(out, distinct_weights(tasks), summary, predictions, state["losses"],
              step_tasks=[names[k] for k in steps_of])
    return summary
