"""The files every training run leaves in its folder, written in one place so every trainer agrees."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn


def write_run(out: Path, model: nn.Module, summary: dict[str, Any], predictions: dict[str, list],
              losses: list[float]) -> None:
    """RUN/model.safetensors, metrics.json, predictions.json and train_log.jsonl (one loss per step)."""
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "predictions.json").write_text(json.dumps(predictions))
    (out / "train_log.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n"
                                                 for i, v in enumerate(losses)))
