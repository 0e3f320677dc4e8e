"""A trained VL-T5 run as one model (`VisionT5LadderModel`): the frozen T5 and image backbones, live, and the
VL-T5 side network. Answers from a closed set are scored as candidates (as evaluation from the cache scores
them); `generate` decodes free text (greedy, or beam search with `num_beams`), the backbone decoder re-run on
each prefix (sidetrain/t5/decoding.py).

Rows: (image, question), ((image, ..., image), question) for k images per row, or the lines `lst predict`
builds ('path<TAB>...<TAB>question').
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from transformers.modeling_outputs import Seq2SeqLMOutput

from featcache.errors import LstError, expected
from featcache.images.prefetch import PixelPrefetcher
from featcache.store import check_match
from featcache.text.splits import pad_batch
from featcache.text.t5 import load_seq2seq_backbone

from ...image_inputs import as_image_split
from ...pretrained import LadderModel
from ...recipe import autocast
from ...t5.decoding import Encoded, beam_search, candidate_scores, same_text, teacher_forced
from ...text_inputs import tokenize
from .pretrained import row_pixels, split_rows
from .recipe import image_layers, images_per_row, load_image_model
from .t5_recipe import build_vision_t5


class VisionT5LadderModel(LadderModel):
    """`model(input_ids, pixel_values, attention_mask, labels | decoder_input_ids)` -> Seq2SeqLMOutput (teacher-
    forced logits over the vocabulary); `generate(input_ids, pixel_values, ...)`; `predict(rows)` -> the best
    candidate answer (or, with generate=True, the generated text)."""

    beam_search = True  # sidetrain/t5/decoding.py
    pipeline_task = "visual-question-answering"
    pipeline_tasks = ("visual-question-answering",)
    input_modalities = ("image", "text")

    def __init__(self, folder: Path, config: dict[str, Any], device: torch.device) -> None:
        super().__init__(folder, config)
        m = self.manifest
        with torch.random.fork_rng(devices=[]):  # loading must not move the caller's random stream
            self.t5 = load_seq2seq_backbone(m["backbone"]["name"], "fp32", str(device))
        check_match("backbone weights", m["backbone"]["revision"], self.t5.revision)
        self.image = load_image_model(m, str(device))
        self.backbone, self.image_backbone = self.t5.model, self.image.model  # submodules: `.to()` moves them
        self.tokenizer = self.t5.tokenizer
        lm_head = self.t5.model.get_output_embeddings().weight.detach().float().cpu()  # no store needed
        self.side = build_vision_t5(self.options, m, {"lm_head": lm_head}, config["decoder_layers"])
        self.side.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
        self.side.to(device)
        self.s, self.per_row = m["seq2seq"], images_per_row(m)

    def frozen_parts(self) -> list[Any]:
        return [self.t5, self.image]

    def can_generate(self) -> bool:
        return True

    def preprocess(self, rows: list) -> dict[str, torch.Tensor]:
        images, questions = split_rows(rows, self.per_row)
        ids, _ = tokenize(self.tokenizer, questions, self.manifest["max_length"])
        input_ids, mask = pad_batch(ids, self.s["pad_token_id"])
        pixels = PixelPrefetcher(as_image_split(images), self.image)
        try:
            return {"input_ids": input_ids, "attention_mask": mask,
                    "pixel_values": row_pixels(pixels, list(range(len(ids))), self.per_row)}
        finally:
            pixels.close()

    def encode(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> Encoded:
        """Both backbones and the side encoder: what every decoding step reads."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        enc_hidden, enc_out = self.t5.encode(input_ids, mask, self.s["encoder_layers"])
        mask = mask.bool().to(self.t5.device)
        enc_hidden = enc_hidden * mask[..., None, None]  # padding zeroed, as the store has it
        states = self.image.hidden_states(pixel_values.flatten(0, pixel_values.dim() - 4), image_layers(self.manifest))
        states = states.view(len(input_ids), -1, *states.shape[2:])  # (B, k * T, n_layers, d_img)
        with autocast(self.options, self.device):
            side_enc, side_mask = self.side.encode_with_image(self.side_inputs(enc_hidden), mask.to(self.device),
                                                              self.side_inputs(states))
        return Encoded(side_enc, side_mask, enc_out, mask, same_text(input_ids, mask))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_: Any) -> Seq2SeqLMOutput:
        """Teacher-forced: `labels` (B, U), -100 at padding (the decoder input is them shifted right), or
        `decoder_input_ids` themselves."""
        if decoder_input_ids is None and labels is None:
            raise LstError(expected("labels or decoder_input_ids for a VL-T5 forward", "neither",
                                    "Use generate() or predict() to produce text."))
        return teacher_forced(self, self.encode(input_ids, pixel_values, attention_mask), labels, decoder_input_ids,
                              decoder_attention_mask)

    def batches(self, rows: list, batch_size: int):
        """(start, Encoded) per batch of rows, images decoded ahead."""
        images, questions = split_rows(rows, self.per_row)
        ids, _ = tokenize(self.tokenizer, questions, self.manifest["max_length"])
        pixels = PixelPrefetcher(as_image_split(images, "the command line"), self.image)
        try:
            for a in range(0, len(ids), batch_size):
                idx = list(range(a, min(a + batch_size, len(ids))))
                input_ids, mask = pad_batch([ids[i] for i in idx], self.s["pad_token_id"])
                yield a, self.encode(input_ids, row_pixels(pixels, idx, self.per_row), mask)
        finally:
            pixels.close()

    @torch.no_grad()
    def logits(self, rows: list, batch_size: int = 32) -> np.ndarray:
        """(N, candidates) log-probability of each candidate answer text."""
        parts = [candidate_scores(self.side, self.t5, self.s, enc).numpy() for _, enc in self.batches(rows, batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.s["candidate_ids"])), dtype=np.float32)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 16, num_beams: int = 1, **_: Any) -> torch.Tensor:
        """As transformers' generate returns it: (B, 1 + n) ids from the decoder start token, EOS where produced."""
        made = beam_search(self.side, self.t5, self.s, self.encode(input_ids, pixel_values, attention_mask),
                           max_new_tokens, num_beams)
        eos = [[self.s["eos_token_id"]] if len(m) < max_new_tokens else [] for m in made]
        return pad_batch([[self.s["decoder_start_token_id"], *m, *e] for m, e in zip(made, eos)],
                         self.s["pad_token_id"])[0]

    @torch.no_grad()
    def generate_texts(self, rows: list, max_new_tokens: int = 16, batch_size: int = 32,
                       num_beams: int = 1) -> list[str]:
        out: list[str] = []
        for _, enc in self.batches(rows, batch_size):
            made = beam_search(self.side, self.t5, self.s, enc, max_new_tokens, num_beams)
            out += [self.tokenizer.decode(m, skip_special_tokens=True) for m in made]
        return out

    def predict(self, rows: list, batch_size: int = 32, generate: bool = False, max_new_tokens: int = 16,
                num_beams: int = 1) -> list[str]:
        """The best candidate answer of each row, or with `generate` its generated text."""
        if generate:
            return self.generate_texts(list(rows), max_new_tokens, batch_size, num_beams)
        return super().predict(rows, batch_size)

    def predict_lines(self, lines: list[str], generate: bool = False, num_beams: int = 1) -> list[str]:
        return self.predict(lines, generate=generate, num_beams=num_beams)
