"""The floors a VL side network must beat, from the same store: linear probes on the question alone (the
mean-pooled last stored text layer, what `lst train --head probe` fits) and on the image alone (the mean over
its stored tokens), fitted as sidetrain/probe.py fits them (L-BFGS, L2 picked on the eval split)."""

from __future__ import annotations

import numpy as np
import torch

from featcache.reader import StoreReader

from ... import metrics as M
from ...probe import L2_GRID, fit_linear, pooled_features
from ...recipe import pick_eval_split
from .data import image_part, image_rows


def image_features(store: StoreReader, name: str) -> torch.Tensor:
    """(n_questions, d_img): the mean over its tokens of each question's image (last stored image layer); with
    several images per row, the first (the one-image floor)."""
    part, index = image_part(store.split(name))
    index = index.reshape(len(index), -1)[:, 0]
    pooled = torch.cat([image_rows(part, np.arange(a, min(a + 256, len(part))))[:, :, -1].mean(1)
                        for a in range(0, len(part), 256)])
    return pooled[torch.from_numpy(index)]


def floors(store: StoreReader, train_split: str = "train", eval_split: str | None = None) -> dict[str, dict]:
    """{'question_only': {split: accuracy}, 'image_only': {...}} on every labelled split but the training one."""
    names = [n for n in store.split_names if store.split(n).labels is not None]
    eval_name = pick_eval_split(store, eval_split, train_split)
    layer = store.manifest["layers"][-1]
    sources = {"question_only": lambda n: pooled_features(store.split(n), layer, None),
               "image_only": lambda n: image_features(store, n)}
    out = {}
    for floor, features in sources.items():
        feats = {n: features(n) for n in names}
        mean, std = feats[train_split].mean(0), feats[train_split].std(0).clamp(min=1e-6)
        feats = {n: (f - mean) / std for n, f in feats.items()}
        labels = {n: store.split(n).labels for n in names}
        y = torch.as_tensor(labels[train_split]).long()
        k = int(store.manifest["task"]["num_labels"])
        best, best_lin = -1.0, None
        for l2 in L2_GRID if eval_name else L2_GRID[1:2]:
            lin = fit_linear(feats[train_split], y, k, l2, "classification")
            score = accuracy(lin, feats[eval_name], labels[eval_name]) if eval_name else 0.0
            if best_lin is None or score > best:
                best, best_lin = score, lin
        out[floor] = {n: accuracy(best_lin, feats[n], labels[n]) for n in names if n != train_split}
    return out


def accuracy(lin: torch.nn.Linear, x: torch.Tensor, labels: np.ndarray) -> float:
    with torch.no_grad():
        pred = lin(x).argmax(-1).numpy()
    return float(M.compute("classification", pred, labels, int(lin.out_features))["accuracy"])
