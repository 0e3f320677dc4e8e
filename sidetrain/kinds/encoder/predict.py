"""`lst predict RUN INPUT`: labels for raw text, from the backbone named in the run's store manifest
plus the trained side network. The backbone runs here (inference needs it); training never does.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from featcache.backbone import load_backbone, resolve_device
from featcache.errors import LstError, expected
from featcache.store import check_match

from ...config import TrainConfig
from ...data import length_bucketed_batches
from ...recipe import autocast
from ...run_files import read_run_config
from .recipe import build_model

log = logging.getLogger(__name__)


def load_run(run: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The run's options and the store manifest it was trained on (RUN/config.json)."""
    resolved = read_run_config(run)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in resolved.items() if k in names})
    return cfg, resolved["store_manifest"]


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """As `lst extract` did: same tokenizer, pairs split on a tab, same max length."""
    firsts, seconds = zip(*[(t.split("\t", 1) + [None])[:2] for t in texts]) if texts else ((), ())
    pairs = list(seconds) if any(s is not None for s in seconds) else None
    if pairs is not None and any(s is None for s in pairs):
        raise LstError(expected("every line to hold a pair (text<TAB>text) or none to", "a mix"))
    enc = tokenizer(list(firsts), pairs, truncation=True, max_length=max_length)
    types = enc.get("token_type_ids") or [[0] * len(x) for x in enc["input_ids"]]
    return enc["input_ids"], types


def text_states(backbone, ids: list[list[int]], types: list[list[int]], idx: np.ndarray,
                layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The live backbone's states of examples `idx`, padded to the longest with padding zeroed (as the store
    has it), and their (B, T) mask."""
    lengths = torch.as_tensor([len(ids[i]) for i in idx])
    t = int(lengths.max())
    input_ids = torch.zeros(len(idx), t, dtype=torch.long)
    type_ids = torch.zeros(len(idx), t, dtype=torch.long)
    for row, i in enumerate(idx):
        input_ids[row, :lengths[row]] = torch.tensor(ids[i])
        type_ids[row, :lengths[row]] = torch.tensor(types[i])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    hidden = backbone.hidden_states(input_ids, mask.long(), type_ids, layers)
    return hidden * mask.to(hidden.device)[..., None, None], mask


class Predictor:
    """Backbone + side network of a finished run, ready to label raw text."""

    def __init__(self, run: str | Path, device: str = "auto") -> None:
        self.cfg, self.manifest = load_run(run)
        self.device = resolve_device(device)
        self.backbone = load_backbone(self.manifest["backbone"]["name"], self.manifest.get("precision", "fp32"),
                                      str(self.device))
        check_match("backbone weights", self.manifest["backbone"]["revision"], self.backbone.revision)
        self.model = build_model(self.cfg, self.manifest)
        self.model.load_state_dict(load_file(str(Path(run) / "model.safetensors")))
        self.model.to(self.device).eval()
        self.task = self.manifest["task"]

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        return tokenize(self.backbone.tokenizer, texts, self.manifest["max_length"])

    @torch.no_grad()
    def predict(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Class indices (classification) or scores (regression), in the order of `texts`."""
        ids, types = self.tokenize(texts)
        lengths = np.array([len(x) for x in ids])
        out = np.zeros(len(texts), dtype=np.float32 if self.task["type"] == "regression" else np.int64)
        for idx in length_bucketed_batches(lengths, batch_size, 0, 0, shuffle=False):
            hidden, mask = text_states(self.backbone, ids, types, idx, self.manifest["layers"])
            with autocast(self.cfg, self.device):
                logits = self.model(hidden.to(self.device), mask.to(self.device)).float()
            out[idx] = (logits.squeeze(-1) if self.task["type"] == "regression" else logits.argmax(-1)).cpu().numpy()
        return out

    def label_names(self, pred: np.ndarray) -> list[str]:
        if self.task["type"] == "regression":
            return [f"{x:.4f}" for x in pred]
        names = self.task["label_names"]
        return [names[i] for i in pred]
