"""A trained T5 run as one model (`Seq2SeqLadderModel`): the frozen T5, live, and the side encoder-decoder;
`lst predict` on T5 runs goes through the functions here (predict.py).

Classification scores every candidate label text, as evaluation from the cache does. Free-text generation
cannot run from a cache (the backbone decoder must see the generated tokens): it decodes greedily, re-running
the backbone decoder on the whole prefix at each step (simple, and exact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from transformers.modeling_outputs import Seq2SeqLMOutput

from featcache.errors import LstError, StoreError, expected
from featcache.text.splits import pad_batch
from featcache.text.t5 import Seq2SeqBackbone, load_seq2seq_backbone

from ...networks.t5 import T5LadderSideNetwork
from ...pretrained import LadderModel, text_lines
from ...recipe import autocast
from ...run_files import run_options
from ...t5.decoding import Encoded, beam_search, candidate_scores, teacher_forced
from ...t5.recipe import build_seq2seq_model


def load_side(folder: str | Path, config: dict[str, Any], backbone: Seq2SeqBackbone) -> T5LadderSideNetwork:
    """The run's side network on the backbone's device, after checking the backbone is the weights it trained on."""
    manifest = config["store_manifest"]
    if "seq2seq" not in manifest:
        raise StoreError(expected("a run trained on an encoder-decoder (T5) store", f"'{folder}' (encoder-only)"))
    if backbone.revision != manifest["backbone"]["revision"]:
        raise StoreError(f"Backbone mismatch: the run was trained on weights {manifest['backbone']['revision']!r}, "
                         f"but {backbone.name} has {backbone.revision!r}.")
    # The live backbone has the LM head already: no store is needed to predict (relative biases: the run's).
    lm_head = backbone.model.get_output_embeddings().weight.detach().float().cpu()
    model = build_seq2seq_model(run_options(config), manifest, {"lm_head": lm_head}, config["decoder_layers"])
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return model.to(backbone.device).eval()


class Seq2SeqLadderModel(LadderModel):
    """T5 with a side network: `model(input_ids, attention_mask, labels | decoder_input_ids)` -> Seq2SeqLMOutput
    (logits over the vocabulary, teacher-forced); `generate(input_ids, ...)` greedy; `predict(texts)` -> the best
    candidate label (or, with generate=True, the generated text)."""

    beam_search = True  # sidetrain/t5/decoding.py
    pipeline_task = "text2text-generation"
    pipeline_tasks = ("text2text-generation", "text-classification")

    def __init__(self, folder: Path, config: dict[str, Any], device: torch.device,
                 backbone: Seq2SeqBackbone | None = None) -> None:
        super().__init__(folder, config)
        self.t5 = backbone or load_seq2seq_backbone(self.manifest["backbone"]["name"], "fp32", str(device))
        self.backbone = self.t5.model  # a submodule: `.to()` moves it with the side network
        self.tokenizer = self.t5.tokenizer
        self.side = load_side(folder, config, self.t5)
        self.s = self.manifest["seq2seq"]

    def frozen_parts(self) -> list[Any]:
        return [self.t5]

    def can_generate(self) -> bool:
        return True

    def preprocess(self, texts: list) -> dict[str, torch.Tensor]:
        ids = self.tokenize(texts)
        input_ids, mask = pad_batch(ids, self.s["pad_token_id"])
        return {"input_ids": input_ids, "attention_mask": mask}

    def tokenize(self, texts: list) -> list[list[int]]:
        split = [line.split("\t", 1) for line in text_lines(texts)]
        firsts = [p[0] for p in split]
        pairs = [p[1] if len(p) > 1 else "" for p in split] if any(len(p) > 1 for p in split) else None
        return self.tokenizer(firsts, pairs, truncation=True, max_length=self.manifest["max_length"])["input_ids"]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Encoded:
        """Backbone and side encoders: what every decoding step reads (t5/decoding.py)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        enc_hidden, enc_out = self.t5.encode(input_ids, mask, self.s["encoder_layers"])
        mask = mask.bool().to(self.t5.device)
        with autocast(self.options, self.device):
            side_enc = self.side.encode(self.side_inputs(enc_hidden), mask.to(self.device))
        return Encoded(side_enc, mask.to(self.device), enc_out, mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_: Any) -> Seq2SeqLMOutput:
        """Teacher-forced: `labels` (B, U), -100 at padding, as transformers' T5 takes them (the decoder input is
        the labels shifted right), or `decoder_input_ids` themselves."""
        if decoder_input_ids is None and labels is None:
            raise LstError(expected("labels or decoder_input_ids for a T5 forward", "neither",
                                    "Use generate() or predict() to produce text."))
        return teacher_forced(self, self.encode(input_ids, attention_mask), labels, decoder_input_ids,
                              decoder_attention_mask)

    @torch.no_grad()
    def logits(self, texts: list, batch_size: int = 32) -> np.ndarray:
        """(N, candidates) log-probability of each candidate label text."""
        ids = self.tokenize(texts)
        parts = []
        for a in range(0, len(ids), batch_size):
            enc = self.encode(*pad_batch(ids[a:a + batch_size], self.s["pad_token_id"]))
            parts.append(candidate_scores(self.side, self.t5, self.s, enc).numpy())
        return np.concatenate(parts) if parts else np.zeros((0, len(self.s["candidate_ids"])), dtype=np.float32)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 16, num_beams: int = 1, **_: Any) -> torch.Tensor:
        """Greedy decoding (beam search with `num_beams` > 1), as transformers' generate returns it: (B, 1 + n)
        ids starting with the decoder start token, ending with EOS where one was produced, padded with the pad id."""
        enc = self.encode(input_ids, attention_mask)
        made = beam_search(self.side, self.t5, self.s, enc, max_new_tokens, num_beams)
        eos = [[self.s["eos_token_id"]] if len(m) < max_new_tokens else [] for m in made]
        rows = [[self.s["decoder_start_token_id"], *m, *e] for m, e in zip(made, eos)]
        return pad_batch(rows, self.s["pad_token_id"])[0]

    @torch.no_grad()
    def generate_texts(self, texts: list, max_new_tokens: int = 16, batch_size: int = 32,
                       num_beams: int = 1) -> list[str]:
        ids = self.tokenize(texts)
        out: list[str] = []
        for a in range(0, len(ids), batch_size):
            enc = self.encode(*pad_batch(ids[a:a + batch_size], self.s["pad_token_id"]))
            made = beam_search(self.side, self.t5, self.s, enc, max_new_tokens, num_beams)
            out += [self.tokenizer.decode(m, skip_special_tokens=True) for m in made]
        return out

    def predict(self, texts: list, batch_size: int = 32, generate: bool = False, max_new_tokens: int = 16,
                num_beams: int = 1) -> list[str]:
        """The best candidate label of each text, or with `generate` its generated text (greedy; beam search with
        `num_beams` > 1)."""
        if generate:
            return self.generate_texts(list(texts), max_new_tokens, batch_size, num_beams)
        return super().predict(texts, batch_size)

    def predict_lines(self, lines: list[str], generate: bool = False, num_beams: int = 1) -> list[str]:
        return self.predict(lines, generate=generate, num_beams=num_beams)
