"""Stage 2: train an LST side network from a feature store (or, for comparison, with the backbone live).

One loop for every kind of store (`train`): AdamW with warm-up and linear decay, clipping, bf16
autocast, a checkpoint each epoch (a killed run resumes), the best epoch picked on the eval split,
the run folder. What differs per kind of store (side network, batches, loss, predictions) comes in a
`Recipe` (recipe.py) from the store's plug-in (kinds/registry.py: `kind_for(manifest).recipe(...)`).
Several stores train one multi-task side network in the same loop: one recipe per store, their networks
sharing every parameter they agree on, one task per batch (multitask.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featcache.errors import TrainConfigError, expected
from featcache.loading import resolve_device
from featcache.progress import progress_bar
from featcache.reader import StoreReader, open_store

from . import multitask as MT
from .config import RESUME_FREE, TrainConfig
from .data import BatchSource, batch_stream
from .kinds.registry import kind_for
from .memory import PeakMemory, gradient_bytes, model_bytes, optimizer_bytes
from .recipe import autocast, evaluate_splits
from .run_files import memory_figures, prepare_run_dir, write_bases, write_config, write_run
from .run_files import summary as run_summary

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
__all__ = ["CHECKPOINT", "RESUME_FREE", "data_seed", "train"]


def train(cfg: TrainConfig, store: StoreReader | None = None,
          on_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train, select the best epoch on the eval split, evaluate every labelled split, write RUN/.

    `store`: an already opened store whose loaded splits are reused (a search opens it once).
    `on_epoch(epoch, record)`: called after each epoch's evaluation (a search reports and prunes
    there; raising stops the run). Several stores in `cfg.store`: one multi-task run (multitask.py; `store` unused).
    """
    device = resolve_device(cfg.device)
    out = prepare_run_dir(cfg.out, create=False)  # nothing or an lst run: never overwrite what lst did not write
    torch.manual_seed(cfg.seed)
    if cfg.multitask:
        stores = MT.open_stores(cfg)  # one line for a probe, a mix of kinds or of backbones
        with PeakMemory(device) as whole:
            return _train_lst(cfg, MT.build_tasks(cfg, stores, device, out), device, out, on_epoch, whole)
    store = store or open_store(cfg.store)
    kind = kind_for(store.manifest)
    if cfg.head == "probe":
        if not kind.probe:
            raise TrainConfigError(expected(f"--head lst for a {kind.name} store (the linear probe reads pooled "
                                            "encoder states)", "--head probe"))
        from .probe import train_probe

        return train_probe(cfg, store)
    with PeakMemory(device) as whole:  # the whole process from here: loading the data included
        return _train_lst(cfg, [MT.build_task(cfg, store, device)], device, out, on_epoch, whole)


def _train_lst(cfg: TrainConfig, tasks: list[MT.Task], device: torch.device, out: Path,
               on_epoch: Callable[[int, dict[str, Any]], None] | None, whole: PeakMemory) -> dict[str, Any]:
    """The loop over one task (a store) or several (a multi-task run: `tasks` share their parameters)."""
    multi = len(tasks) > 1
    first = tasks[0]
    store, train_split, eval_name, recipe = first.store, first.train_split, first.eval_name, first.recipe
    model, sources, metric = MT.joint_model(tasks), recipe.sources, recipe.metric
    amp = autocast(cfg, device)
    forwards = [torch.compile(t.recipe.model, dynamic=True) if cfg.compile else t.recipe.model for t in tasks]

    steps_per_epoch = sum(-(-len(t.train_split) // cfg.batch_size) for t in tasks)
    schedule = cfg.schedule(steps_per_epoch)
    total = schedule.total
    params = [p for p in model.parameters() if p.requires_grad]  # frozen: side embeddings, T5's LM head
    # fused: one kernel per parameter instead of ~10 per parameter (~100 small tensors: CPU step time)
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, schedule.factor)

    resolved = MT.run_config(cfg, tasks, RESUME_FREE) if multi else recipe.resolved
    state = {"epoch": 0, "step": 0, "best": -np.inf, "best_state": None, "history": [], "losses": [],
             "train_seconds": 0.0, "wait_seconds": 0.0}
    if multi:  # each step's task, examples seen per task, the selected epoch
        state.update(task_steps=[], task_examples=[0] * len(tasks), best_epoch=None)
    if cfg.resume and (out / CHECKPOINT).exists():
        state = _load_checkpoint(out / CHECKPOINT, resolved, model, optim, sched)
    write_config(out, resolved)
    optim_at_start = optimizer_bytes(optim)  # non-zero when resumed
    with PeakMemory(device) as mem, progress_bar("train", total, unit="step") as bar:
        bar.advance(state["step"])
        for epoch in range(state["epoch"], cfg.epochs):
            if state["step"] >= total:
                break
            model.train()
            t0 = time.perf_counter()
            plan = MT.epoch_plan(tasks, cfg.batch_size, data_seed(cfg), epoch, cfg.task_sampling)
            streams = []
            for i, t in enumerate(tasks):  # one stream per task, each over its batches in the plan's order
                source = t.recipe.sources[t.cfg.train_split]
                streams.append(batch_stream(source, [idx for k, idx in plan if k == i], device,
                                            _prefetch(cfg, source, device)))
            readers = [iter(s) for s in streams]
            first_step = len(state["losses"])
            try:
                for k, idx in plan:
                    b = next(readers[k])
                    with amp:
                        loss = tasks[k].recipe.loss(forwards[k], b)
                    optim.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
                    optim.step()
                    sched.step()
                    state["losses"].append(loss.item())
                    if multi:
                        state["task_steps"].append(k)
                        state["task_examples"][k] += len(idx)
                    state["step"] += 1
                    bar.advance()
                    if state["step"] >= total:
                        break
            finally:
                for s in streams:
                    s.close()
            seconds = time.perf_counter() - t0
            waited = sum(s.wait_seconds for s in streams)
            state["train_seconds"] += seconds
            state["wait_seconds"] += waited
            record = {"epoch": epoch + 1, "step": state["step"], "seconds": seconds,
                      "data_wait_fraction": waited / max(seconds, 1e-9),
                      "train_loss": float(np.mean(state["losses"][-len(plan):]))}
            selection = None
            if multi:
                record["train_loss"] = float(np.mean(state["losses"][first_step:]))  # this epoch's steps only
                selection = MT.evaluate_epoch(tasks, amp, record, state["losses"][first_step:],
                                              state["task_steps"][first_step:])
            elif eval_name:
                scores = recipe.score(store, eval_name, recipe.predict(eval_name, amp))
                record.update({f"eval_{k}": v for k, v in scores.items()})
                selection = scores[metric]
            if selection is not None and selection > state["best"]:
                state["best"] = selection
                state["best_state"] = _snapshot(model)
                if multi:
                    state["best_epoch"] = epoch + 1
            state["history"].append(record)
            state["epoch"] = epoch + 1
            _save_checkpoint(out / CHECKPOINT, state, resolved, model, optim, sched)
            if on_epoch is not None:
                on_epoch(epoch + 1, record)
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) if isinstance(v, float) else v
                                                 for k, v in record.items()})
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    if multi:
        common = {"train_seconds": state["train_seconds"],
                  "wait_seconds": state["wait_seconds"], "peak_memory_bytes": mem.peak_bytes,
                  "peak_memory_kind": mem.kind, "mode": "online" if cfg.online else "cached", "head": "lst"}
        return MT.finish(out, cfg, tasks, state, amp, common, lambda: _memory(
            model, params, optim, optim_at_start, MT.data_of(tasks), mem, whole.update(),
            state["best_state"] is not None))
    results, predictions = evaluate_splits(store, list(sources), cfg.train_split, recipe.task, recipe.num_labels,
                                           lambda name: recipe.predict(name, amp), recipe.scores)
    step, history, best = state["step"], state["history"], state["best"]
    examples = len(train_split) * len(history) if not cfg.max_steps else step * cfg.batch_size
    summary = run_summary(metric=metric, eval_split=eval_name, best_eval=None if best == -np.inf else best,
                          splits=results, history=history, steps=step, train_seconds=state["train_seconds"],
                          examples=examples, wait_seconds=state["wait_seconds"], peak_memory_bytes=mem.peak_bytes,
                          peak_memory_kind=mem.kind, mode="online" if cfg.online else "cached", head="lst",
                          trainable_parameters=sum(p.numel() for p in params),
                          memory=_memory(model, params, optim, optim_at_start, MT.data_of(tasks), mem,
                                         whole.update(), state["best_state"] is not None))
    write_run(out, model, summary, predictions, state["losses"])
    write_bases(out, store)  # a compressed store's bases: live inference projects onto them
    return summary


def _memory(model: torch.nn.Module, params: list, optim: torch.optim.Optimizer, optim_at_start: int,
            data: dict[str, Any], loop: PeakMemory, whole: PeakMemory, kept_best: bool) -> dict[str, Any]:
    """metrics.json's `memory`: the exact sizes of what training keeps, the sampled peaks, and activations as
    the loop's peak minus what it allocated for the known pieces (gradients, new optimizer state, the best
    epoch's copy; on a GPU, minus everything resident: the loop's peak there is absolute)."""
    weights, grads, optimizer = model_bytes(model), gradient_bytes(params), optimizer_bytes(optim)
    best = model_bytes(model) if kept_best else 0
    if loop.device.type == "cuda":
        activations = loop.peak_bytes - weights - grads - optimizer - best - data["data_device_bytes"]
    else:
        activations = loop.peak_bytes - grads - (optimizer - optim_at_start) - best
    return memory_figures(
        model_bytes=weights, gradient_bytes=grads, optimizer_bytes=optimizer, best_weights_bytes=best, **data,
        activation_bytes=max(0, activations), process_start_rss_anon_bytes=whole.start_rss_anon,
        peak_rss_anon_bytes=whole.peak_rss_anon, peak_rss_file_bytes=whole.peak_rss_file,
        peak_device_bytes=loop.peak_bytes if loop.device.type == "cuda" else None)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights; a tensor that several names share (a multi-task run's shared parameters) once."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.stride(), v.dtype) if v.numel() else k
        if key not in copies:
            copies[key] = v.detach().clone()
        out[k] = copies[key]
    return out


def data_seed(cfg: TrainConfig) -> int:
    """The seed of the batch order: --data-seed, else --seed."""
    return cfg.seed if cfg.data_seed is None else cfg.data_seed


def _prefetch(cfg: TrainConfig, source: BatchSource, device: torch.device) -> bool:
    """A reader thread pays off when it hides disk reads or host-to-GPU copies. A batch gathered from
    RAM or a warm memory-mapped store on a CPU takes a few ms, and a second thread there slows torch's own threads more (measured:
    113 vs 70 ms per MiniLM side step on 2 cores)."""
    if cfg.online or source.on_device:
        return False
    if cfg.prefetch is not None:
        return cfg.prefetch
    if device.type != "cpu":
        return True
    return source.policy == "stream"


def _identity(resolved: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must match. --task-sampling matters to a multi-task run only (a single-store run's
    checkpoint from before the option existed still resumes)."""
    free = RESUME_FREE if isinstance(resolved.get("store"), list) else RESUME_FREE | {"task_sampling"}
    return {k: v for k, v in resolved.items() if k not in free}


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
