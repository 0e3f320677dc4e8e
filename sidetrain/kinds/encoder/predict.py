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
        """As `lst extract` did: same tokenizer, pairs split on a tab, same max length."""
        firsts, seconds = zip(*[(t.split("\t", 1) + [None])[:2] for t in texts]) if texts else ((), ())
        pairs = list(seconds) if any(s is not None for s in seconds) else None
        if pairs is not None and any(s is None for s in pairs):
            raise LstError(expected("every line to hold a pair (text<TAB>text) or none to", "a mix"))
        enc = self.backbone.tokenizer(list(firsts), pairs, truncation=True, max_length=self.manifest["max_length"])
        types = enc.get("token_type_ids") or [[0] * len(x) for x in enc["input_ids"]]
        return enc["input_ids"], types

    @torch.no_grad()
    def predict(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Class indices (classification) or scores (regression), in the order of `texts`."""
        ids, types = self.tokenize(texts)
        lengths = np.array([len(x) for x in ids])
        out = np.zeros(len(texts), dtype=np.float32 if self.task["type"] == "regression" else np.int64)
        for idx in length_bucketed_batches(lengths, batch_size, 0, 0, shuffle=False):
            t = int(lengths[idx].max())
            input_ids = torch.zeros(len(idx), t, dtype=torch.long)
            type_ids = torch.zeros(len(idx), t, dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, :lengths[i]] = torch.tensor(ids[i])
                type_ids[row, :lengths[i]] = torch.tensor(types[i])
            mask = torch.arange(t)[None, :] < torch.as_tensor(lengths[idx])[:, None]
            hidden = self.backbone.hidden_states(input_ids, mask.long(), type_ids, self.manifest["layers"])
            hidden = hidden * mask.to(hidden.device)[..., None, None]
            with autocast(self.cfg, self.device):
                logits = self.model(hidden.to(self.device), mask.to(self.device)).float()
            out[idx] = (logits.squeeze(-1) if self.task["type"] == "regression" else logits.argmax(-1)).cpu().numpy()
        return out

    def label_names(self, pred: np.ndarray) -> list[str]:
        if self.task["type"] == "regression":
            return [f"{x:.4f}" for x in pred]
        names = self.task["label_names"]
        return [names[i] for i in pred]
