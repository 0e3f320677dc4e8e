"""A trained encoder run as one model (`EncoderLadderModel`): the frozen text encoder, live, and the side
network; `lst predict` on text runs through it (predict.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from transformers.modeling_outputs import SequenceClassifierOutput

from featcache.compress import Basis
from featcache.store import check_match
from featcache.text.backbone import Backbone, load_backbone

from ...data import length_bucketed_batches
from ...pretrained import LadderModel, gather_rows, padded_text, text_lines
from ...recipe import autocast, loss
from ...text_inputs import tokenize
from .recipe import build_model


class EncoderLadderModel(LadderModel):
    """Text classification or regression: `model(input_ids, attention_mask, token_type_ids, labels)` ->
    SequenceClassifierOutput; `predict(texts)` -> labels (a pair: a (text, text) tuple or 'text<TAB>text')."""

    pipeline_task = "text-classification"
    pipeline_tasks = ("text-classification",)

    def __init__(self, folder: Path, config: dict[str, Any], device: torch.device,
                 backbone: Backbone | None = None) -> None:
        super().__init__(folder, config)
        facts = self.manifest["backbone"]
        self.text = backbone or load_backbone(facts["name"], self.manifest.get("precision", "fp32"), str(device))
        check_match("backbone weights", facts["revision"], self.text.revision)
        self.backbone = self.text.model  # a submodule: `.to()` moves it with the side network
        self.tokenizer = self.text.tokenizer
        self.side = build_model(self.options, self.manifest)
        self.side.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
        self.side.to(device)

    def frozen_parts(self) -> list[Any]:
        return [self.text]

    def project_live(self, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Live states projected onto the compressed store's basis (every stored layer), as training read them."""
        components, mean = bases[""]
        self.register_buffer("basis_components", components.float().to(self.device), persistent=False)
        self.register_buffer("basis_mean", mean.float().to(self.device), persistent=False)

    def tokenize(self, texts: list) -> tuple[list[list[int]], list[list[int]]]:
        return tokenize(self.tokenizer, text_lines(texts), self.manifest["max_length"])

    def preprocess(self, texts: list) -> dict[str, torch.Tensor]:
        ids, types = self.tokenize(texts)
        return padded_text(ids, types, range(len(ids)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **_: Any) -> SequenceClassifierOutput:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        hidden = self.text.hidden_states(input_ids, mask.long(), token_type_ids, self.manifest["layers"])
        if hasattr(self, "basis_components"):  # a compressed store: its projection, as the store gives it back
            hidden = Basis(self.basis_components, self.basis_mean, None).roundtrip(hidden)
        mask = mask.bool().to(hidden.device)
        hidden = hidden * mask[..., None, None]  # padding zeroed, as the store has it
        segments = None if token_type_ids is None else token_type_ids.to(self.device)  # --pooling pair reads them
        with autocast(self.options, self.device):
            logits = self.side(self.side_inputs(hidden), mask.to(self.device), None, segments).float()
        return SequenceClassifierOutput(
            loss=None if labels is None else loss(self.task["type"], logits, labels.to(logits.device), 0.0),
            logits=logits)

    @torch.no_grad()
    def logits(self, texts: list, batch_size: int = 64) -> np.ndarray:
        ids, types = self.tokenize(texts)
        batches = length_bucketed_batches(np.array([len(x) for x in ids]), batch_size, 0, 0, shuffle=False)
        return gather_rows(len(ids), ((idx, self(**padded_text(ids, types, idx)).logits.cpu().numpy())
                                      for idx in batches))

    def predict_ids(self, texts: list, batch_size: int = 64) -> np.ndarray:
        """Class indices (classification) or scores (regression), in the order of `texts`."""
        scores = self.logits(texts, batch_size)
        return scores[:, 0] if self.task["type"] == "regression" else scores.argmax(-1)
