"""`lst predict RUN INPUT` on an encoder run: labels for raw text from the backbone named in the run's store
manifest plus the trained side network, both in one `EncoderLadderModel` (pretrained.py: the one
implementation, shared with the Python API). The backbone runs here (inference needs it); training never does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...pretrained import read_model_config
from .pretrained import EncoderLadderModel


class Predictor:
    """Backbone + side network of a finished run, ready to label raw text (`model`: the side network)."""

    def __init__(self, run: str | Path, device: str = "auto") -> None:
        from featcache.loading import resolve_device

        self.ladder = EncoderLadderModel(Path(run), read_model_config(run), resolve_device(device)).eval()
        self.model, self.backbone, self.device = self.ladder.side, self.ladder.text, self.ladder.device
        self.cfg, self.manifest, self.task = self.ladder.options, self.ladder.manifest, self.ladder.task

    def predict(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Class indices (classification) or scores (regression), in the order of `texts`."""
        return self.ladder.predict_ids(texts, batch_size)

    def label_names(self, pred: np.ndarray) -> list[str]:
        if self.task["type"] == "regression":
            return [f"{x:.4f}" for x in pred]
        return [self.ladder.label_names[i] for i in pred]
