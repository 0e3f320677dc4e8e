"""`lst predict RUN INPUT`: labels for raw text, from the backbone named in the run's store manifest
plus the trained side network. The backbone runs here (inference needs it); training never does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from featcache.loading import resolve_device
from featcache.store import check_match
from featcache.text.backbone import load_backbone

from ...data import length_bucketed_batches
from ...recipe import autocast
from ...run_files import load_run
from ...text_inputs import text_states, tokenize
from .recipe import build_model

log = logging.getLogger(__name__)


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
