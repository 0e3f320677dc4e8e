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
from .recipe import build_model, image_layers, images_per_row, load_image_model, load_text_model


def split_rows(rows: list, per_row: int = 1) -> tuple[list, list[str]]:
    """(image, question) rows, or 'image path<TAB>question' lines -> images, questions. With `per_row` k > 1
    images per row: ((image, ..., image), question) rows or 'path<TAB>...<TAB>path<TAB>question' lines, and the
    images come back flat, row by row (k per row)."""
    images, questions = [], []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            parts = row.split("\t", per_row)
            row = (parts[0] if per_row == 1 else parts[:per_row], *parts[per_row:])
        if isinstance(row, dict):
            row = (row.get("image") if per_row == 1 else row.get("images"), row.get("question"))
        several = len(row) > 0 and isinstance(row[0], (list, tuple)) and len(row[0]) == per_row
        if len(row) != 2 or row[1] is None or (per_row > 1 and not several):
            what = "(image, question) rows" if per_row == 1 else f"rows of {per_row} images and a question"
            raise LstError(expected(what, f"{row!r} at position {i}"))
        images += [row[0]] if per_row == 1 else list(row[0])
        questions.append(row[1])
    return images, text_lines(questions)


def row_pixels(pixels: PixelPrefetcher, rows: list[int], per_row: int) -> torch.Tensor:
    """Pixel values of questions `rows` (their k images each, flat in `pixels`): (B, C, H, W) for one image per
    row, (B, k, C, H, W) for k."""
    values = pixels.get([r * per_row + j for r in rows for j in range(per_row)])
    return values if per_row == 1 else values.view(len(rows), per_row, *values.shape[1:])


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
        self.per_row = images_per_row(self.manifest)

    def frozen_parts(self) -> list[Any]:
        return [self.text, self.image]

    def preprocess(self, rows: list) -> dict[str, torch.Tensor]:
        images, questions = split_rows(rows, self.per_row)
        ids, types = tokenize(self.tokenizer, questions, self.manifest["max_length"])
        pixels = PixelPrefetcher(as_image_split(images), self.image)
        try:
            return {**padded_text(ids, types, range(len(ids))),
                    "pixel_values": row_pixels(pixels, list(range(len(ids))), self.per_row)}
        finally:
            pixels.close()

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **_: Any) -> SequenceClassifierOutput:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        hidden = self.text.hidden_states(input_ids, mask.long(), token_type_ids, self.manifest["layers"])
        mask = mask.bool().to(hidden.device)
        hidden = hidden * mask[..., None, None]  # padding zeroed, as the store has it
        states = self.image.hidden_states(pixel_values.flatten(0, pixel_values.dim() - 4), image_layers(self.manifest))
        states = states.view(len(input_ids), -1, *states.shape[2:])  # (B, k * T, n_layers, d_img)
        with autocast(self.options, self.device):
            logits = self.side(self.side_inputs(hidden), mask.to(self.device), self.side_inputs(states)).float()
        return SequenceClassifierOutput(
            loss=None if labels is None else loss("classification", logits, labels.to(logits.device), 0.0),
            logits=logits)

    @torch.no_grad()
    def logits(self, rows: list, batch_size: int = 32) -> np.ndarray:
        images, questions = split_rows(rows, self.per_row)
        ids, types = tokenize(self.tokenizer, questions, self.manifest["max_length"])
        pixels = PixelPrefetcher(as_image_split(images, "the command line"), self.image)  # decoded ahead
        batches = length_bucketed_batches(np.array([len(x) for x in ids]), batch_size, 0, 0, shuffle=False)
        try:
            return gather_rows(len(ids), ((idx, self(pixel_values=row_pixels(pixels, idx.tolist(), self.per_row),
                                                     **padded_text(ids, types, idx)).logits.cpu().numpy())
                                          for idx in batches))
        finally:
            pixels.close()
