"""`lst predict RUN IMAGE...`: a label per image file, from the run's backbone (live) and its side network, both
in one `ImageLadderModel` (pretrained.py: the one implementation, shared with the Python API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featcache.loading import resolve_device

from .pretrained import ImageLadderModel


def predict_images(run: Path, config: dict[str, Any], paths: list[str], device: str = "auto",
                   batch_size: int = 32) -> list[str]:
    return ImageLadderModel(Path(run), config, resolve_device(device)).eval().predict(paths, batch_size)
