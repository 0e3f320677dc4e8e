"""GLUE-style metrics, from numpy arrays of predictions and references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def accuracy(pred: np.ndarray, ref: np.ndarray) -> float:
    return float((pred == ref).mean())


def f1_binary(pred: np.ndarray, ref: np.ndarray) -> float:
    tp = float(((pred == 1) & (ref == 1)).sum())
    fp = float(((pred == 1) & (ref != 1)).sum())
    fn = float(((pred != 1) & (ref == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def f1_macro(pred: np.ndarray, ref: np.ndarray) -> float:
    scores = [f1_binary((pred == c).astype(int), (ref == c).astype(int)) for c in np.unique(ref)]
    return float(np.mean(scores)) if scores else 0.0


def matthews(pred: np.ndarray, ref: np.ndarray) -> float:
    """Matthews correlation (multi-class form, equal to the binary one for two classes)."""
    classes = np.union1d(pred, ref)
    c = pd.crosstab(pd.Categorical(ref, classes), pd.Categorical(pred, classes), dropna=False).to_numpy(float)
    t, p, n = c.sum(1), c.sum(0), c.sum()
    cov = np.trace(c) * n - t @ p
    denom = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float(cov / denom) if denom else 0.0


def pearson(pred: np.ndarray, ref: np.ndarray) -> float:
    if pred.std() == 0 or ref.std() == 0:
        return 0.0
    return float(np.corrcoef(pred, ref)[0, 1])


def spearman(pred: np.ndarray, ref: np.ndarray) -> float:
    return pearson(pd.Series(pred).rank().to_numpy(), pd.Series(ref).rank().to_numpy())


CLASSIFICATION = {"accuracy": accuracy, "f1": f1_binary, "f1_macro": f1_macro, "matthews": matthews}
REGRESSION = {"pearson": pearson, "spearman": spearman}
METRICS = {**CLASSIFICATION, **REGRESSION}
# Free-text targets (--task generate on a T5 text part), scored by generating: sidetrain/text_metrics.py
GENERATION = ("exact_match", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider")
METRIC_NAMES = (*METRICS, *GENERATION)  # every --metric a run may select on


def compute(task: str, pred: np.ndarray, ref: np.ndarray, num_labels: int) -> dict[str, float]:
    """Every metric that makes sense for the task (binary F1 only for two classes)."""
    if task == "regression":
        return {name: fn(pred, ref) for name, fn in REGRESSION.items()}
    out = {"accuracy": accuracy(pred, ref), "f1_macro": f1_macro(pred, ref), "matthews": matthews(pred, ref)}
    if num_labels == 2:
        out["f1"] = f1_binary(pred, ref)
    return out


# GLUE's headline metric per task, for a dataset folder named after it (other GLUE tasks: accuracy)
GLUE_METRICS = {"cola": "matthews", "mrpc": "f1", "qqp": "f1", "stsb": "pearson"}


def default_metric(manifest: dict[str, Any]) -> str:
    """The metric a store's task is judged by: GLUE's when its dataset folder is named after a GLUE task
    (CoLA: Matthews, MRPC/QQP: F1, STS-B: Pearson), else accuracy (classification) or Pearson (regression)."""
    task, num_labels = manifest["task"]["type"], manifest["task"]["num_labels"]
    source = (manifest.get("dataset") or {}).get("source") or ""
    glue = GLUE_METRICS.get(Path(source).name.lower().replace("-", "").replace("_", ""))
    if glue in CLASSIFICATION and task != "regression" and (glue != "f1" or num_labels == 2):
        return glue
    return "pearson" if task == "regression" else "accuracy"
