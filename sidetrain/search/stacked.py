"""K side networks trained in one pass over the data: one read of each batch, one batched forward.

Trials that share everything that shapes the network and the batches (reduction factor, kept layers,
batch size, epochs, seed, dropout, ...) and differ only in optimiser settings (lr, weight decay,
gradient clipping) are stacked with torch.func: parameters get a leading K axis and the model runs
under vmap, so K small kernels become one batched kernel (on a CPU the side network is bound by
kernel overhead, not FLOPs). AdamW is written out here because its learning rate differs per slice.

Each member writes the same run folder as `lst train`. With dropout on, members draw their own masks
(vmap randomness="different"), so a member equals a separate run in distribution, not bit for bit.
"""

from __future__ import annotations

import copy
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

from featcache.backbone import resolve_device
from featcache.errors import TrainConfigError, expected
from featcache.reader import StoreReader, open_store

from .. import metrics as M
from ..config import TrainConfig
from ..data import CachedBatches, iterate, length_bucketed_batches
from ..kinds.registry import kind_for
from ..recipe import evaluate_splits, pick_eval_split, resolved_config, select_metric
from ..run_files import summary as run_summary
from ..run_files import write_config, write_run

log = logging.getLogger(__name__)
PER_MEMBER = {"out", "lr", "weight_decay", "grad_clip", "init"}  # may differ inside a stack


def stack_key(cfg: TrainConfig) -> tuple:
    """Configs with equal keys can be trained in one stack."""
    return tuple((k, json.dumps(v, sort_keys=True)) for k, v in sorted(asdict(cfg).items()) if k not in PER_MEMBER)


class _StackedAdamW:
    """torch.optim.AdamW's update (decoupled decay, bias correction) with a learning rate per stack member."""

    def __init__(self, params: dict[str, torch.Tensor], lrs: torch.Tensor, decays: torch.Tensor,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.lrs, self.decays, self.betas, self.eps = params, lrs, decays, betas, eps
        self.m = {k: torch.zeros_like(p) for k, p in params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in params.items()}
        self.t = 0

    @torch.no_grad()
    def step(self, factor: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)
        for k, p in self.params.items():
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr = (self.lrs * factor).view(shape)
            p.mul_(1 - lr * self.decays.view(shape))
            self.m[k].lerp_(p.grad, 1 - b1)
            self.v[k].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(self.m[k] * (lr / c1), (self.v[k].sqrt() / c2).add_(self.eps), value=-1.0)
            p.grad = None


def _clip(params: dict[str, torch.Tensor], max_norms: torch.Tensor) -> None:
    """clip_grad_norm_ per member: each member's gradient norm over all its parameters."""
    sq = sum(p.grad.pow(2).flatten(1).sum(1) for p in params.values())
    coef = (max_norms / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    coef = torch.where(max_norms > 0, coef, torch.ones_like(coef))
    for p in params.values():
        p.grad.mul_(coef.view((-1,) + (1,) * (p.dim() - 1)))


def train_stacked(cfgs: list[TrainConfig], store: StoreReader | None = None,
                  on_epoch: list[Callable[[int, dict[str, Any]], None] | None] | None = None) -> list[dict[str, Any]]:
    """Train len(cfgs) side networks in one pass; a list of `train()`-like summaries, one per config.

    `on_epoch[k]` raising stops reporting for member k (a pruned trial); its summary has "stopped": the
    exception, and its run folder only config.json (as a pruned `train()` run).
    """
    from torch.func import functional_call, stack_module_state

    if len({stack_key(c) for c in cfgs}) != 1:
        raise TrainConfigError(expected("configs that differ only in lr, weight decay and grad clip",
                                        "configs that differ in the network or the batches"))
    cfg0, k_n = cfgs[0], len(cfgs)
    if cfg0.online:
        raise TrainConfigError(expected("cached runs for stacked training", "--online"))
    if cfg0.head != "lst":
        raise TrainConfigError(expected("the LST side network for stacked training", f"head {cfg0.head}"))
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
    for c in cfgs:
        write_config(Path(c.out), resolved_config(c, manifest, metric, eval_name, stacked_with=k_n))
    params, buffers = stack_module_state(models)  # {name: (K, ...)} leaves with requires_grad
    frozen = {n for n, p in models[0].named_parameters() if not p.requires_grad}  # unused side embeddings
    params = {n: p.detach() if n in frozen else p for n, p in params.items()}
    trained = {n: p for n, p in params.items() if n not in frozen}
    base = copy.deepcopy(models[0]).to("meta")
    for module in base.modules():  # vmap has no batching rule for CPU flash attention; eager batches well
        if getattr(module, "config", None) is not None:
            module.config._attn_implementation = "eager"

    def forward(p, b, hidden, mask):
        return functional_call(base, (p, b), (hidden, mask))

    vforward = torch.vmap(forward, in_dims=(0, 0, None, None), randomness="different")
    optim = _StackedAdamW(trained, torch.tensor([c.lr for c in cfgs], device=device),
                          torch.tensor([c.weight_decay for c in cfgs], device=device))
    clips = torch.tensor([c.grad_clip or 0.0 for c in cfgs], device=device)
    steps_per_epoch = -(-len(train_split) // cfg0.batch_size)
    total = steps_per_epoch * cfg0.epochs if not cfg0.max_steps else min(cfg0.max_steps, steps_per_epoch * cfg0.epochs)
    warmup = cfg0.warmup_steps if cfg0.warmup_steps >= 0 else min(500, total // 10)

    def factor(s: int) -> float:  # train()'s LambdaLR schedule
        return (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))

    sources = {n: CachedBatches(store.split(n), None, cfg0.preload) for n in store.split_names
               if store.split(n).labels is not None}
    step, losses, history = 0, [], [[] for _ in cfgs]
    best = [-np.inf] * k_n
    best_state: list[dict[str, torch.Tensor] | None] = [None] * k_n
    stopped: list[BaseException | None] = [None] * k_n
    train_seconds = 0.0
    for epoch in range(cfg0.epochs):
        base.train()
        t0 = time.perf_counter()
        batches = length_bucketed_batches(train_split.lengths, cfg0.batch_size, cfg0.seed, epoch)
        for b in iterate(sources[cfg0.train_split], batches, device):
            logits = vforward(params, buffers, b.hidden, b.mask)  # (K, B, C)
            if task == "regression":
                per = ((logits.squeeze(-1) - b.labels.float()) ** 2).mean(1)
            else:
                per = F.cross_entropy(logits.flatten(0, 1), b.labels.repeat(k_n), reduction="none").view(k_n, -1).mean(1)
            per.sum().backward()  # members share no parameter: each gets its own gradient
            _clip(trained, clips)
            optim.step(factor(step))
            losses.append(per.detach().cpu().numpy())
            step += 1
            if step >= total:
                break
        seconds = (time.perf_counter() - t0) / k_n  # one pass trains every member: each gets its share
        train_seconds += seconds
        base.eval()
        preds = _predict(lambda b: vforward(params, buffers, b.hidden, b.mask), k_n, sources[eval_name],
                         store.split(eval_name), cfg0.batch_size, task, device) if eval_name else None
        for k in range(k_n):
            record = {"epoch": epoch + 1, "step": step, "seconds": seconds, "data_wait_fraction": 0.0,
                      "train_loss": float(np.mean([x[k] for x in losses[-len(batches):]]))}
            if preds is not None:
                scores = M.compute(task, preds[k], store.split(eval_name).labels, num_labels)
                record.update({f"eval_{m}": v for m, v in scores.items()})
                if scores[metric] > best[k] and stopped[k] is None:
                    best[k] = scores[metric]
                    best_state[k] = {n: p[k].detach().clone() for n, p in {**params, **buffers}.items()}
            history[k].append(record)
            if callbacks[k] is not None and stopped[k] is None:
                try:
                    callbacks[k](epoch + 1, record)
                except Exception as err:  # noqa: BLE001 - a pruned member stops; the stack goes on
                    stopped[k] = err
        if all(s is not None for s in stopped) or step >= total:
            break
    out = []
    for k, (c, model) in enumerate(zip(cfgs, models)):
        if stopped[k] is not None:
            out.append({"metric": metric, "stopped": stopped[k], "history": history[k]})
            continue
        state = best_state[k] or {n: p[k].detach() for n, p in {**params, **buffers}.items()}
        model.load_state_dict(state, strict=False)
        out.append(_finish(c, model, store, sources, task, num_labels, metric, eval_name, best[k], history[k],
                           [float(x[k]) for x in losses], step, train_seconds, device, k_n))
    return out


@torch.no_grad()
def _predict(logits_of: Callable[[Any], torch.Tensor], k_n: int, source, split, batch_size: int, task: str,
             device: torch.device) -> np.ndarray:
    """(K, n) predictions of every member for a split, in the split's order (batches as `lst train`'s
    evaluation); `logits_of(batch)` -> (K, B, C)."""
    batches = length_bucketed_batches(split.lengths, batch_size * 2, seed=0, epoch=0, shuffle=False)
    out = np.zeros((k_n, len(split)), dtype=np.float32 if task == "regression" else np.int64)
    for idx, b in zip(batches, iterate(source, batches, device)):
        logits = logits_of(b).float()
        out[:, idx] = (logits.squeeze(-1) if task == "regression" else logits.argmax(-1)).cpu().numpy()
    return out


def _finish(cfg: TrainConfig, model, store, sources, task, num_labels, metric, eval_name, best, history, losses,
            step, train_seconds, device, k_n) -> dict[str, Any]:
    """Evaluate one member and write its run folder (the files `train()` writes)."""
    model.eval()
    results, predictions = evaluate_splits(store, list(sources), cfg.train_split, task, num_labels, lambda name: _predict(
        lambda b: model(b.hidden, b.mask)[None], 1, sources[name], store.split(name), cfg.batch_size, task, device)[0])
    summary = run_summary(metric=metric, eval_split=eval_name, best_eval=None if best == -np.inf else float(best),
                          splits=results, history=history, steps=step, train_seconds=train_seconds,
                          examples=len(store.split(cfg.train_split)) * len(history), wait_seconds=0.0,
                          peak_memory_bytes=0, peak_memory_kind="not measured (stacked)", mode="cached", head="lst",
                          trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                          stacked_with=k_n)
    out = Path(cfg.out)
    write_run(out, model, summary, predictions, losses)
    return summary
