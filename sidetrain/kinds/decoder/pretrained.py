"""A trained decoder-only run as one model (`DecoderLadderModel`): the frozen causal backbone, live, and the causal
side network; `lst predict` on text runs through it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from transformers.modeling_outputs import SequenceClassifierOutput

from featcache.errors import LstError, expected
from featcache.kinds.decoder.backbone import CausalBackbone, load_causal_backbone
from featcache.store import check_match

from ...data import length_bucketed_batches
from ...pretrained import LadderModel, gather_rows, padded_text, text_lines
from ...recipe import autocast, loss
from ...text_inputs import tokenize
from .recipe import build_model


class DecoderLadderModel(LadderModel):
    """Text classification or regression from the last real token: `model(input_ids, attention_mask, labels)` ->
    SequenceClassifierOutput; `predict(texts)` -> labels."""

    pipeline_task = "text-classification"
    pipeline_tasks = ("text-classification",)

    def __init__(self, folder: Path, config: dict[str, Any], device: torch.device,
                 backbone: CausalBackbone | None = None) -> None:
        super().__init__(folder, config)
        facts = self.manifest["backbone"]
        self.text = backbone or load_causal_backbone(facts["name"], self.manifest.get("precision", "fp32"),
                                                     str(device))
        check_match("backbone weights", facts["revision"], self.text.revision)
        self.backbone = self.text.model  # a submodule: `.to()` moves it with the side network
        self.tokenizer = self.text.tokenizer
        self.side = build_model(self.options, self.manifest)
        self.side.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
        self.side.to(device)

    def frozen_parts(self) -> list[Any]:
        return [self.text]

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise LstError(expected("a decoder run that generates text (trained through the LM head: a store extracted "
                                "with --task generate or --label-text) for --generate",
                                "a run with a classification head", "Drop --generate; predict() gives its labels."))

    def tokenize(self, texts: list) -> list[list[int]]:
        return tokenize(self.tokenizer, text_lines(texts), self.manifest["max_length"])[0]

    def preprocess(self, texts: list) -> dict[str, torch.Tensor]:
        ids = self.tokenize(texts)
        inputs = padded_text(ids, [[0] * len(x) for x in ids], range(len(ids)))
        inputs.pop("token_type_ids")
        return inputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_: Any) -> SequenceClassifierOutput:
        """Right-padded `input_ids` (B, T) (a causal model's last real token is found from the mask)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        hidden = self.text.hidden_states(input_ids, mask.long(), None, self.manifest["layers"])
        mask = mask.bool().to(hidden.device)
        hidden = hidden * mask[..., None, None]  # padding zeroed, as the store has it
        with autocast(self.options, self.device):
            logits = self.side(self.side_inputs(hidden), mask.to(self.device)).float()
        return SequenceClassifierOutput(
            loss=None if labels is None else loss(self.task["type"], logits, labels.to(logits.device), 0.0),
            logits=logits)

    @torch.no_grad()
    def logits(self, texts: list, batch_size: int = 64) -> np.ndarray:
        ids = self.tokenize(texts)
        zeros = [[0] * len(x) for x in ids]
        batches = length_bucketed_batches(np.array([len(x) for x in ids]), batch_size, 0, 0, shuffle=False)
        out = ((idx, self(**{k: v for k, v in padded_text(ids, zeros, idx).items() if k != "token_type_ids"})
                .logits.cpu().numpy()) for idx in batches)
        return gather_rows(len(ids), out)
