"""A trained vision-language run as one model (`VisionLanguageLadderModel`): the frozen text and image
backbones, live, and the side network; `lst predict RUN --text Q --image PATH` runs through it (predict.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from transformers.modeling_outputs import SequenceClassifierOutput

from featcache.errors import LstError, expected
from featcache.images.prefetch import PixelPrefetcher

from ...data import length_bucketed_batches
from ...image_inputs import as_image_split
from ...pretrained import LadderModel, gather_rows, padded_text, text_lines
from ...recipe import autocast, loss
from ...text_inputs import tokenize
from .recipe import build_model, image_layers, load_image_model, load_text_model


def split_rows(rows: list) -> tuple[list, list[str]]:
    """(image, question) rows, or 'image path<TAB>question' lines -> images, questions."""
    images, questions = [], []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            row = row.split("\t", 1)
        if isinstance(row, dict):
            row = (row.get("image"), row.get("question"))
        if len(row) != 2 or row[1] is None:
            raise LstError(expected("(image, question) rows", f"{row!r} at position {i}"))
        images.append(row[0])
        questions.append(row[1])
    return images, text_lines(questions)


class VisionLanguageLadderModel(LadderModel):
    """Visual question answering as answer classification: `model(input_ids, attention_mask, token_type_ids,
    pixel_values, labels)` -> SequenceClassifierOutput; `predict([(image, question), ...])` -> answers."""

    pipeline_task = "visual-question-answering"
    pipeline_tasks = ("visual-question-answering",)
    input_modalities = ("image", "text")

    def __init__(self, folder: Path, config: dict[str, Any], device: torch.device) -> None:
        super().__init__(folder, config)
        self.text = load_text_model(self.manifest, str(device), self.manifest.get("precision", "fp32"))
        self.image = load_image_model(self.manifest, str(device))  # both checked against the recorded weights
        self.backbone, self.image_backbone = self.text.model, self.image.model  # submodules: `.to()` moves them
        self.tokenizer = self.text.tokenizer
        self.side = build_model(self.options, self.manifest)
        self.side.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
        self.side.to(device)

    def frozen_parts(self) -> list[Any]:
        return [self.text, self.image]

    def preprocess(self, rows: list) -> dict[str, torch.Tensor]:
        images, questions = split_rows(rows)
        ids, types = tokenize(self.tokenizer, questions, self.manifest["max_length"])
        pixels = PixelPrefetcher(as_image_split(images), self.image)
        try:
            return {**padded_text(ids, types, range(len(ids))), "pixel_values": pixels.get(list(range(len(ids))))}
        finally:
            pixels.close()

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **_: Any) -> SequenceClassifierOutput:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        hidden = self.text.hidden_states(input_ids, mask.long(), token_type_ids, self.manifest["layers"])
        mask = mask.bool().to(hidden.device)
        hidden = hidden * mask[..., None, None]  # padding zeroed, as the store has it
        states = self.image.hidden_states(pixel_values, image_layers(self.manifest))
        with autocast(self.options, self.device):
            logits = self.side(self.side_inputs(hidden), mask.to(self.device), self.side_inputs(states)).float()
        return SequenceClassifierOutput(
            loss=None if labels is None else loss("classification", logits, labels.to(logits.device), 0.0),
            logits=logits)

    @torch.no_grad()
    def logits(self, rows: list, batch_size: int = 32) -> np.ndarray:
        images, questions = split_rows(rows)
        ids, types = tokenize(self.tokenizer, questions, self.manifest["max_length"])
        pixels = PixelPrefetcher(as_image_split(images, "the command line"), self.image)  # decoded ahead
        batches = length_bucketed_batches(np.array([len(x) for x in ids]), batch_size, 0, 0, shuffle=False)
        try:
            return gather_rows(len(ids), ((idx, self(pixel_values=pixels.get(idx.tolist()),
                                                     **padded_text(ids, types, idx)).logits.cpu().numpy())
                                          for idx in batches))
        finally:
            pixels.close()
