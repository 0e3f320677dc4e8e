"""The floor every side network must beat: a linear probe on the mean-pooled last stored layer.

Multinomial logistic regression (or least squares for regression tasks) on the same store, splits and
metrics as `lst train`; full-batch L-BFGS, with the L2 strength picked on the eval split. It writes the
run files `lst train` writes (run_files.py), one history record per L2 strength; not the epoch loop of
train.py (a full-batch L-BFGS fit has no epochs, batches or schedule to share).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from featcache.reader import SplitReader, StoreReader

from . import metrics as M
from .data import CachedBatches, data_figures, length_bucketed_batches
from .memory import PeakMemory, gradient_bytes, model_bytes, optimizer_bytes, tensor_bytes
from .recipe import (
    check_labels,
    evaluate_splits,
    labelled_splits,
    pick_eval_split,
    resolved_config,
    select_metric,
)
from .run_files import memory_figures, write_config, write_run
from .run_files import summary as run_summary

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger(__name__)
L2_GRID = (1e-4, 1e-3, 1e-2)  # per-example L2 penalty on the weights


def pooled_features(split: SplitReader, layer: int, preload: bool | None = None, batch_size: int = 256,
                    source: CachedBatches | None = None) -> torch.Tensor:
    """(n_examples, d): the mean over real tokens of stored layer `layer`, in the split's order (read
    through `source`, else a source of the default policy)."""
    source = source or CachedBatches(split, [layer], preload)
    out = torch.zeros(len(split), int(split.manifest["hidden_size"]))
    for idx in length_bucketed_batches(split.lengths, batch_size, 0, 0, shuffle=False):
        b = source(idx)
        m = b.mask.unsqueeze(-1).float()
        out[torch.as_tensor(idx)] = (b.hidden[:, :, 0] * m).sum(1) / m.sum(1).clamp(min=1)
    return out


def fit_linear(x: torch.Tensor, y: torch.Tensor, n_out: int, l2: float, task: str, steps: int = 100) -> torch.nn.Linear:
    return fit_linear_and_optimizer(x, y, n_out, l2, task, steps)[0]


def fit_linear_and_optimizer(x: torch.Tensor, y: torch.Tensor, n_out: int, l2: float, task: str,
                             steps: int = 100) -> tuple[torch.nn.Linear, torch.optim.LBFGS]:
    """The L2-penalised linear fit by L-BFGS, and the optimizer (its history is the probe's optimizer memory)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], n_out)
    torch.nn.init.zeros_(lin.weight)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        out = lin(x)
        loss = F.mse_loss(out.squeeze(-1), y) if task == "regression" else F.cross_entropy(out, y)
        loss = loss + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin, opt


def _predict(lin: torch.nn.Linear, x: torch.Tensor, task: str) -> np.ndarray:
    with torch.no_grad():
        out = lin(x)
    return (out.squeeze(-1) if task == "regression" else out.argmax(-1)).numpy()


def train_probe(cfg: TrainConfig, store: StoreReader) -> dict[str, Any]:
    """Fit the probe for each L2 strength, keep the best on the eval split, write the run files
    (run_files.py: the same files and metrics.json keys as `lst train`)."""
    manifest = store.manifest
    task, num_labels = manifest["task"]["type"], manifest["task"]["num_labels"]
    metric = select_metric(cfg, manifest, task)
    layer = manifest["layers"][-1]
    train_split = check_labels(store, cfg.train_split)
    eval_name = pick_eval_split(store, cfg.eval_split, cfg.train_split)
    names = labelled_splits(store)
    t0 = time.perf_counter()
    with PeakMemory(torch.device("cpu")) as mem:
        sources = {n: CachedBatches(store.split(n), [layer], cfg.preload) for n in names}
        feats = {n: pooled_features(store.split(n), layer, source=sources[n]) for n in names}
        # standardise with the training statistics: L-BFGS converges in far fewer steps
        mean, std = feats[cfg.train_split].mean(0), feats[cfg.train_split].std(0).clamp(min=1e-6)
        feats = {n: (f - mean) / std for n, f in feats.items()}
        y_train = torch.as_tensor(train_split.labels)
        y_train = y_train.float() if task == "regression" else y_train.long()
        history, best, best_lin = [], -np.inf, None
        for l2 in L2_GRID if eval_name else L2_GRID[1:2]:
            t_fit = time.perf_counter()
            lin, opt = fit_linear_and_optimizer(feats[cfg.train_split], y_train, num_labels, l2, task)
            record = {"epoch": len(history) + 1, "step": len(history) + 1, "seconds": time.perf_counter() - t_fit,
                      "data_wait_fraction": 0.0, "train_loss": _loss(lin, feats[cfg.train_split], y_train, task),
                      "l2": l2}
            if eval_name:
                scores = M.compute(task, _predict(lin, feats[eval_name], task), store.split(eval_name).labels, num_labels)
                record.update({f"eval_{k}": v for k, v in scores.items()})
                if scores[metric] > best:
                    best, best_lin = scores[metric], lin
            history.append(record)
            log.info("probe: %s", record)
        best_lin = best_lin or lin
    seconds = time.perf_counter() - t0
    results, predictions = evaluate_splits(store, names, cfg.train_split, task, num_labels,
                                           lambda name: _predict(best_lin, feats[name], task))
    out = Path(cfg.out)
    write_config(out, resolved_config(cfg, manifest, metric, eval_name, probe_layer=layer, probe_l2_grid=list(L2_GRID)))
    summary = run_summary(metric=metric, eval_split=eval_name, best_eval=None if best == -np.inf else best,
                          splits=results, history=history, steps=len(history), train_seconds=seconds,
                          examples=len(train_split) * len(history), wait_seconds=0.0,
                          peak_memory_bytes=mem.peak_bytes, peak_memory_kind=mem.kind, mode="cached", head="probe",
                          trainable_parameters=sum(p.numel() for p in best_lin.parameters()),
                          memory=_memory(best_lin, opt, feats, sources, store, mem))
    weights = {"weight": best_lin.weight, "bias": best_lin.bias, "mean": mean, "std": std}
    write_run(out, weights, summary, predictions, [r["train_loss"] for r in history])
    return summary


def _memory(lin: torch.nn.Linear, opt: torch.optim.LBFGS, feats: dict[str, torch.Tensor], sources: dict[str, Any],
            store: StoreReader, mem: PeakMemory) -> dict[str, Any]:
    """metrics.json's `memory` for the probe: the linear layer, its gradient and L-BFGS history (of the last
    fit), the states the sources copied into RAM plus the pooled features (n x d floats per split), the peaks."""
    weights, grads, optimizer = model_bytes(lin), gradient_bytes(lin.parameters()), optimizer_bytes(opt)
    data = data_figures(sources, store)
    data["data_held_bytes"] += tensor_bytes(feats.values())
    return memory_figures(
        model_bytes=weights, gradient_bytes=grads, optimizer_bytes=optimizer, best_weights_bytes=0, **data,
        activation_bytes=max(0, mem.peak_bytes - weights - grads - optimizer - data["data_held_bytes"]),
        process_start_rss_anon_bytes=mem.start_rss_anon, peak_rss_anon_bytes=mem.peak_rss_anon,
        peak_rss_file_bytes=mem.peak_rss_file, peak_device_bytes=None)


def _loss(lin: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, task: str) -> float:
    """The fitted probe's task loss on its training features (without the L2 term)."""
    with torch.no_grad():
        out = lin(x)
        return float(F.mse_loss(out.squeeze(-1), y) if task == "regression" else F.cross_entropy(out, y))
