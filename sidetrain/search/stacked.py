"""K side networks trained in one pass over the data: one read of each batch, one forward for all.

    train_stacked([TrainConfig(...), TrainConfig(...), ...])      # a list of `train()` summaries

Members share the batches (same batch size, same batch order: seeded by the first member's --data-seed
or --seed, recorded as `data_seed` in every member's config.json, so `lst train` with a member's
config.json walks the same batches) and the network shape (reduction factor, kept layers, side heads,
pooling). Everything else is per member: seed (its own initial weights and dropout masks), dropout and
attention-dropout rates, lr, weight decay, gradient clipping, warm-up, schedule length (epochs,
--max-steps), --init. `stack_key` says which configs can share a stack.

The members' trainable parameters are one (K, P) tensor, a row per member. The store kind may fuse
the K networks into one (`kind.fuse_stack`: the encoder kind's kinds/encoder/stacked_model.py, every
linear a batched matmul over the member axis, one SDPA call over members x heads); otherwise the
members run under torch.func.vmap over views of the rows (then dropout must be equal across members).
AdamW (decoupled decay, bias correction; torch's formula), clipping and the schedule are written out
here over the rows, with a rate per member. A member that finishes (its epochs or steps) or is pruned
(its `on_epoch` raised) stops updating; at the end of that epoch it is evaluated, its run folder
written, and its row dropped from the stack (compaction), so the others run at the smaller size.
Each member writes the run folder `lst train` writes (run_files.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from featcache.errors import TrainConfigError, expected
from featcache.loading import resolve_device
from featcache.reader import StoreReader, open_store

from .. import metrics as M
from ..config import TrainConfig
from ..data import CachedBatches, batch_stream, data_figures, iterate, length_bucketed_batches
from ..kinds.registry import kind_for
from ..memory import PeakMemory, model_bytes
from ..recipe import autocast, evaluate_splits, pick_eval_split, resolved_config, select_metric
from ..run_files import memory_figures, write_config, write_run
from ..run_files import summary as run_summary

log = logging.getLogger(__name__)
# May differ inside a stack (the fused network; under vmap dropout rates must be equal).
PER_MEMBER = {"out", "seed", "data_seed", "lr", "weight_decay", "grad_clip", "warmup_steps", "epochs", "max_steps",
              "dropout", "attention_dropout", "init", "resume"}
VMAP_SHARED = ("dropout", "attention_dropout")
BATCH_ORDER = "shared by the stack: the same batch size and batch order (data_seed) for every member"


def stack_key(cfg: TrainConfig) -> tuple:
    """Configs with equal keys can train in one stack (same network shape, same batches, same placement)."""
    return tuple((k, json.dumps(v, sort_keys=True)) for k, v in sorted(asdict(cfg).items()) if k not in PER_MEMBER)


class _VmapStack:
    """The fallback for side networks the kind does not fuse: torch.func.vmap over views of the rows."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        from torch.func import stack_module_state

        self.names = [n for n, p in models[0].named_parameters() if p.requires_grad]
        self.shapes = [tuple(p.shape) for n, p in models[0].named_parameters() if p.requires_grad]
        self.sizes = [math.prod(s) for s in self.shapes]
        params, self.buffers = stack_module_state(models)
        self.frozen = {n: p.detach() for n, p in params.items() if n not in self.names}
        self.base = copy.deepcopy(models[0]).to("meta")
        for module in self.base.modules():  # vmap has no batching rule for CPU flash attention; eager batches
            if getattr(module, "config", None) is not None:
                module.config._attn_implementation = "eager"

    def row(self, model) -> torch.Tensor:
        params = dict(model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def state(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: c.reshape(s).clone() for n, s, c in zip(self.names, self.shapes, torch.split(row.detach(), self.sizes))}

    def forward(self, flat, hidden, mask, training, dropout=None, attention_dropout=0.0, segments=None) -> torch.Tensor:
        from torch.func import functional_call

        n_m = flat.shape[0]
        params = {n: c.view(n_m, *s) for n, s, c in zip(self.names, self.shapes, torch.split(flat, self.sizes, dim=1))}
        idx = self.rows  # the members still in the stack, as rows of the frozen tensors and buffers
        params.update({n: p[idx] for n, p in self.frozen.items()})
        buffers = {n: b[idx] for n, b in self.buffers.items()}
        self.base.train(training)

        def one(p, b, h, m, seg):
            return functional_call(self.base, (p, b), (h, m, None, seg))

        segments = None if segments is None else segments.to(mask.device)
        return torch.vmap(one, in_dims=(0, 0, None, None, None), randomness="different")(params, buffers, hidden, mask,
                                                                                         segments)


class _Rows:
    """The trainable rows (K, P) of the members still stepping, AdamW's moments, and the per-member rates."""

    def __init__(self, flat: torch.Tensor, members: list[int], cfgs: list[TrainConfig], device) -> None:
        self.flat = flat.requires_grad_(True)
        self.row_bytes = flat[0].numel() * flat.element_size()  # one member's trainable parameters
        self.m = torch.zeros_like(flat)
        self.v = torch.zeros_like(flat)
        self.members = members
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in members]  # AdamW's step count per row
        self._set(cfgs, device)

    def _set(self, cfgs, device) -> None:
        pick = [cfgs[k] for k in self.members]

        def col(f):
            return torch.tensor([float(f(c)) for c in pick], device=device)

        self.lr, self.decay = col(lambda c: c.lr), col(lambda c: c.weight_decay)
        self.clip = col(lambda c: c.grad_clip or 0.0)
        self.dropout, self.attention_dropout = col(lambda c: c.dropout), col(lambda c: c.attention_dropout)

    def keep(self, members: list[int], cfgs, device) -> None:
        """Compaction: only these members' rows (and moments) stay in the stack."""
        idx = torch.tensor([self.members.index(k) for k in members], dtype=torch.long, device=self.flat.device)
        self.flat = self.flat.detach()[idx].clone().requires_grad_(True)
        self.m, self.v = self.m[idx].clone(), self.v[idx].clone()
        self.steps = [self.steps[self.members.index(k)] for k in members]
        self.members = members
        self._set(cfgs, device)

    @torch.no_grad()
    def step(self, factors: list[float], betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        """clip_grad_norm_ per member, then torch's fused AdamW kernel on each member's row with that
        member's lr * schedule factor and weight decay (the kernel `lst train` runs); a member whose
        factor is 0 (past its last step) is not touched."""
        from torch.optim.adamw import adamw

        g = self.flat.grad
        if bool((self.clip > 0).any()):
            norm = torch.linalg.vector_norm(g, dim=1)
            coef = (self.clip / (norm + 1e-6)).clamp(max=1.0)
            g.mul_(torch.where(self.clip > 0, coef, torch.ones_like(coef))[:, None])
        lrs, decays = self.lr.tolist(), self.decay.tolist()
        for j, f in enumerate(factors):
            if f <= 0:
                continue
            adamw([self.flat[j]], [g[j]], [self.m[j]], [self.v[j]], [], [self.steps[j]], fused=True, amsgrad=False,
                  beta1=betas[0], beta2=betas[1], lr=lrs[j] * f, weight_decay=decays[j], eps=eps, maximize=False)
        self.flat.grad = None


def _check(cfgs: list[TrainConfig]) -> None:
    if not cfgs:
        raise TrainConfigError(expected("at least one config to train", "none"))
    keys = [stack_key(c) for c in cfgs]
    if len(set(keys)) != 1:
        diff = sorted({k for key in keys for k, v in key if dict(keys[0]).get(k) != v})
        raise TrainConfigError(expected("configs that share the network shape and the batches (stack_key)",
                                        f"configs that differ in {', '.join(diff)}"))
    if cfgs[0].online:
        raise TrainConfigError(expected("cached runs for stacked training", "--online"))
    if cfgs[0].head != "lst":
        raise TrainConfigError(expected("the LST side network for stacked training", f"head {cfgs[0].head}"))


def train_stacked(cfgs: list[TrainConfig], store: StoreReader | None = None,
                  on_epoch: list[Callable[[int, dict[str, Any]], None] | None] | None = None,
                  engine: str = "auto") -> list[dict[str, Any]]:
    """Train len(cfgs) side networks in one pass; a list of `train()` summaries, one per config.

    `on_epoch[k]` raising stops member k (a pruned trial): its summary has "stopped": the exception, and
    its run folder only config.json (as a pruned `train()` run). `engine`: auto (the kind's fused
    network when it has one, else vmap), fused, or vmap.
    """
    _check(cfgs)
    cfg0, k_n = cfgs[0], len(cfgs)
    batch_seed = cfg0.seed if cfg0.data_seed is None else cfg0.data_seed
    cfgs = [dataclasses.replace(c, data_seed=batch_seed) for c in cfgs]  # as run: recorded in config.json
    callbacks = list(on_epoch or [None] * k_n)
    device = resolve_device(cfg0.device)
    store = store or open_store(cfg0.store)
    manifest = store.manifest
    task, num_labels = manifest["task"]["type"], manifest["task"]["num_labels"]
    metric = select_metric(cfg0, manifest, task)
    train_split = store.split(cfg0.train_split)
    eval_name = pick_eval_split(store, cfg0.eval_split, cfg0.train_split)
    kind = kind_for(manifest)
    if not kind.search_facts(manifest).stackable:
        raise TrainConfigError(expected("a store whose trials can be stacked", f"a {kind.name} store", "Use --stack 1."))
    models = []
    for c in cfgs:  # as train(): the seed fixes the initial weights (and --init pruned starts from the backbone)
        torch.manual_seed(c.seed)
        models.append(kind.stack_member(c, store, device))
    net = kind.fuse_stack(models) if engine in ("auto", "fused") else None
    if net is None and engine == "fused":
        raise TrainConfigError(expected("a side network the store kind fuses", type(models[0]).__name__,
                                        "Use engine='vmap'."))
    if net is None:
        unequal = [f for f in VMAP_SHARED if len({getattr(c, f) for c in cfgs}) > 1]
        if unequal and engine == "auto":  # one vmapped stack per dropout setting, one after the other
            out: list[dict[str, Any] | None] = [None] * k_n
            parts: dict[tuple, list[int]] = {}
            for k, c in enumerate(cfgs):
                parts.setdefault(tuple(getattr(c, f) for f in VMAP_SHARED), []).append(k)
            for ks in parts.values():
                for k, s in zip(ks, train_stacked([cfgs[k] for k in ks], store, [callbacks[k] for k in ks], "vmap")):
                    out[k] = s
            return out
        if unequal:
            raise TrainConfigError(expected(f"equal {', '.join(unequal)} across members stacked under vmap", unequal))
        net = _VmapStack(models)
    for c, m in zip(cfgs, models):
        write_config(Path(c.out), resolved_config(c, manifest, metric, eval_name, layers=m.kept_layers,
                                                  pooling=getattr(m, "pooling", None),
                                                  stacked_with=k_n, stacked_batches=BATCH_ORDER))
    rows = _Rows(torch.stack([net.row(m) for m in models]).to(device), list(range(k_n)), cfgs, device)
    _track(net, rows)
    amp = autocast(cfg0, device)
    torch.manual_seed(batch_seed)  # the dropout masks of the stack
    steps_per_epoch = -(-len(train_split) // cfg0.batch_size)
    schedules = [c.schedule(steps_per_epoch) for c in cfgs]
    sources = {n: CachedBatches(store.split(n), None, cfg0.preload) for n in store.split_names
               if store.split(n).labels is not None}
    with PeakMemory(device) as mem:  # the stack's peak, shared by its members (one process trains them all)
        step = 0
        losses: list[list[float]] = [[] for _ in cfgs]
        history: list[list[dict[str, Any]]] = [[] for _ in cfgs]
        best = [-np.inf] * k_n
        best_row: list[torch.Tensor | None] = [None] * k_n
        stopped: list[BaseException | None] = [None] * k_n
        train_seconds = [0.0] * k_n
        wait_seconds = [0.0] * k_n
        out: list[dict[str, Any] | None] = [None] * k_n
        for epoch in range(max(c.epochs for c in cfgs)):
            if not rows.members:
                break
            t0 = time.perf_counter()
            batches = length_bucketed_batches(train_split.lengths, cfg0.batch_size, batch_seed, epoch)
            stream = batch_stream(sources[cfg0.train_split], batches, device, False)  # one read per batch, for all
            for b in stream:
                stepping = [j for j, k in enumerate(rows.members) if step < schedules[k].total]
                if not stepping:
                    break
                with amp:
                    logits = net.forward(rows.flat, b.hidden, b.mask, True, rows.dropout, rows.attention_dropout,
                                         b.token_type_ids)
                logits = logits.float()
                if task == "regression":
                    per = ((logits.squeeze(-1) - b.labels.float()) ** 2).mean(1)
                else:
                    n_m = logits.shape[0]
                    per = F.cross_entropy(logits.flatten(0, 1), b.labels.repeat(n_m), reduction="none").view(n_m, -1).mean(1)
                per.sum().backward()  # members share no parameter: each row gets its own gradient
                rows.step([schedules[k].factor(step) for k in rows.members])
                values = per.detach().cpu().tolist()
                for j in stepping:
                    losses[rows.members[j]].append(values[j])
                step += 1
            ran = list(rows.members)
            seconds = (time.perf_counter() - t0) / len(ran)  # one pass trains every member: each gets its share
            waited = stream.wait_seconds / len(ran)
            preds = _predict(net, rows.flat.detach(), sources[eval_name], store.split(eval_name), cfg0.batch_size,
                             task, device, amp) if eval_name else None
            done = []
            for j, k in enumerate(ran):
                train_seconds[k] += seconds
                wait_seconds[k] += waited
                record = {"epoch": epoch + 1, "step": min(step, schedules[k].total), "seconds": seconds,
                          "data_wait_fraction": waited / max(seconds, 1e-9), "train_loss": float(np.mean(losses[k][-len(batches):]))}
                if preds is not None:
                    scores = M.compute(task, preds[j], store.split(eval_name).labels, num_labels)
                    record.update({f"eval_{m}": v for m, v in scores.items()})
                    if scores[metric] > best[k]:
                        best[k] = scores[metric]
                        best_row[k] = rows.flat[j].detach().clone()
                history[k].append(record)
                if callbacks[k] is not None:
                    try:
                        callbacks[k](epoch + 1, record)
                    except Exception as err:  # noqa: BLE001 - a pruned member stops; the stack goes on
                        stopped[k] = err
                if stopped[k] is not None:
                    out[k] = {"metric": metric, "stopped": stopped[k], "history": history[k]}
                    done.append(k)
                elif epoch + 1 >= cfgs[k].epochs or step >= schedules[k].total:
                    if best_row[k] is None:
                        best_row[k] = rows.flat[j].detach().clone()
                    done.append(k)
            finishing = [k for k in done if stopped[k] is None]
            if finishing:
                finished = _finish(net, [best_row[k] for k in finishing], [models[k] for k in finishing], store, sources,
                                   cfgs[0], task, num_labels, amp, device)
                peak = _peak_so_far(mem)
                memory = _memory(models, k_n * rows.row_bytes, sources, store, mem, peak)  # the stack's: one for all
                for k, (splits, predictions) in zip(finishing, finished):
                    c = cfgs[k]
                    summary = run_summary(
                        metric=metric, eval_split=eval_name, best_eval=None if best[k] == -np.inf else float(best[k]),
                        splits=splits, history=history[k], steps=len(losses[k]), train_seconds=train_seconds[k],
                        examples=len(train_split) * len(history[k]) if not c.max_steps else len(losses[k]) * c.batch_size,
                        wait_seconds=wait_seconds[k], peak_memory_bytes=peak, peak_memory_kind=f"{mem.kind} (the whole stack)", mode="cached",
                        head="lst", trainable_parameters=sum(p.numel() for p in models[k].parameters() if p.requires_grad),
                        stacked_with=k_n, memory=memory)
                    write_run(Path(c.out), models[k], summary, predictions, losses[k])
                    out[k] = summary
            if done:
                rows.keep([k for k in rows.members if k not in done], cfgs, device)
                _track(net, rows)
        return [o if o is not None else {"metric": metric, "stopped": TrainConfigError("not trained"), "history": []}
                for o in out]


def _memory(models: list[torch.nn.Module], row_bytes: int, sources: dict[str, Any], store: StoreReader,
            mem: PeakMemory, peak: int) -> dict[str, Any]:
    """metrics.json's `memory` of a stacked member: the whole stack's, as its peak is (one process, one
    pass trains them all). Exact sizes for the K members (their modules, the (K, P) rows, their gradient,
    AdamW's two moments, a best row each) and the stack's sampled peaks; activations as in `lst train`."""
    weights = sum(model_bytes(m) for m in models) + row_bytes  # the members' modules and the rows they train
    grads, optimizer, best = row_bytes, 2 * row_bytes, row_bytes
    data = data_figures(sources, store)
    # CPU: the moments exist before the pass's start; gradients and best rows are allocated in it
    resident = weights + grads + optimizer + best + data["data_device_bytes"]
    activations = peak - (resident if mem.device.type == "cuda" else grads + best)
    return memory_figures(
        model_bytes=weights, gradient_bytes=grads, optimizer_bytes=optimizer, best_weights_bytes=best, **data,
        activation_bytes=max(0, activations), process_start_rss_anon_bytes=mem.start_rss_anon,
        peak_rss_anon_bytes=mem.peak_rss_anon, peak_rss_file_bytes=mem.peak_rss_file,
        peak_device_bytes=peak if mem.device.type == "cuda" else None)


def _peak_so_far(mem: PeakMemory) -> int:
    """The stack's peak until now: CUDA max allocated, or anonymous RSS above the stack's start."""
    if mem.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(mem.device))
    return mem.update().peak_rss_anon - mem.start_rss_anon


def _track(net, rows: _Rows) -> None:
    if isinstance(net, _VmapStack):
        net.rows = torch.tensor(rows.members, dtype=torch.long)


@torch.no_grad()
def _predict(net, flat: torch.Tensor, source, split, batch_size: int, task: str, device, amp) -> np.ndarray:
    """(K, n) predictions of every row for a split, in the split's order (batches as `lst train`'s evaluation)."""
    batches = length_bucketed_batches(split.lengths, batch_size * 2, seed=0, epoch=0, shuffle=False)
    out = np.zeros((flat.shape[0], len(split)), dtype=np.float32 if task == "regression" else np.int64)
    for idx, b in zip(batches, iterate(source, batches, device)):
        with amp:
            logits = net.forward(flat, b.hidden, b.mask, False, segments=b.token_type_ids).float()
        out[:, idx] = (logits.squeeze(-1) if task == "regression" else logits.argmax(-1)).cpu().numpy()
    return out


def _finish(net, best_rows, models, store, sources, cfg0, task, num_labels, amp, device):
    """Finishing members: their best rows loaded into their models, and every labelled split but the
    training one predicted for all of them in one stacked pass per split; [(splits, predictions)]."""
    flat = torch.stack(best_rows)
    if isinstance(net, _VmapStack):
        net.rows = torch.zeros(len(best_rows), dtype=torch.long)  # frozen parts and buffers are equal across members
    preds = {name: _predict(net, flat, sources[name], store.split(name), cfg0.batch_size, task, device, amp)
             for name in sources if name != cfg0.train_split}
    out = []
    for j, model in enumerate(models):
        model.load_state_dict(net.state(best_rows[j]), strict=False)
        out.append(evaluate_splits(store, list(sources), cfg0.train_split, task, num_labels,
                                   lambda name, j=j: preds[name][j]))
    return out
