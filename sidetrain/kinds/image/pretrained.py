"""A trained image run as one model (`ImageLadderModel`): the frozen image backbone, live, and the side network;
`lst predict RUN IMAGE...` runs through it (predict.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from transformers.modeling_outputs import ImageClassifierOutput

from featcache.images.prefetch import PixelPrefetcher

from ...image_inputs import as_image_split
from ...pretrained import LadderModel, gather_rows
from ...recipe import autocast, loss
from .recipe import build_model, load_store_backbone, stored_layers


class ImageLadderModel(LadderModel):
    """Image classification: `model(pixel_values, labels)` -> ImageClassifierOutput; `predict(images)` -> labels
    (images: paths, bytes, PIL images or HxWx3 uint8 arrays)."""

    pipeline_task = "image-classification"
    pipeline_tasks = ("image-classification",)
    input_modalities = ("image",)

    def __init__(self, folder: Path, config: dict[str, Any], device: torch.device) -> None:
        super().__init__(folder, config)
        self.image = load_store_backbone(self.manifest, str(device))  # checked against the recorded weights
        self.backbone = self.image.model  # a submodule: `.to()` moves it with the side network
        self.side = build_model(self.options, self.manifest)
        self.side.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
        self.side.to(device)

    def frozen_parts(self) -> list[Any]:
        return [self.image]

    def preprocess(self, images: list) -> dict[str, torch.Tensor]:
        pixels = PixelPrefetcher(as_image_split(list(images)), self.image)
        try:
            return {"pixel_values": pixels.get(list(range(len(images))))}
        finally:
            pixels.close()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                **_: Any) -> ImageClassifierOutput:
        hidden = self.image.hidden_states(pixel_values, stored_layers(self.manifest))  # (B, tokens, n, d)
        with autocast(self.options, self.device):
            logits = self.side(self.side_inputs(hidden), None).float()
        return ImageClassifierOutput(
            loss=None if labels is None else loss("classification", logits, labels.to(logits.device), 0.0),
            logits=logits)

    @torch.no_grad()
    def logits(self, images: list, batch_size: int = 32) -> np.ndarray:
        pixels = PixelPrefetcher(as_image_split(list(images), "the command line"), self.image)  # decoded ahead
        try:
            batches = (list(range(a, min(a + batch_size, len(images)))) for a in range(0, len(images), batch_size))
            return gather_rows(len(images), ((rows, self(pixels.get(rows)).logits.cpu().numpy()) for rows in batches))
        finally:
            pixels.close()
