"""`lst predict RUN IMAGE...`: a label per image file, from the run's backbone (live) and its side network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from featcache.images.datasets import ImageSplit
from featcache.images.prefetch import PixelPrefetcher
from featcache.loading import resolve_device

from ...recipe import autocast
from ...run_files import run_options
from .recipe import build_model, load_store_backbone, stored_layers


@torch.no_grad()
def predict_images(run: Path, config: dict[str, Any], paths: list[str], device: str = "auto",
                   batch_size: int = 32) -> list[str]:
    cfg = run_options(config)
    manifest = config["store_manifest"]
    dev = resolve_device(device)
    backbone = load_store_backbone(manifest, str(dev))
    model = build_model(cfg, manifest)
    model.load_state_dict(load_file(str(Path(run) / "model.safetensors")))
    model.to(dev).eval()
    images = ImageSplit("input", [Path(p) for p in paths], None, "the command line", list(paths))
    pixels = PixelPrefetcher(images, backbone)
    out = np.zeros(len(paths), dtype=np.int64)
    try:
        for a in range(0, len(paths), batch_size):
            rows = list(range(a, min(a + batch_size, len(paths))))
            hidden = backbone.hidden_states(pixels.get(rows), stored_layers(manifest))
            with autocast(cfg, dev):
                logits = model(hidden.to(dev), None).float()
            out[rows] = logits.argmax(-1).cpu().numpy()
    finally:
        pixels.close()
    label_names = manifest["task"]["label_names"]
    return [label_names[i] for i in out]
