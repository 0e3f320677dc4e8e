"""Predictions on raw text with a trained T5 side network: the backbone runs live (no store needed). The
computation is pretrained.py's (`Seq2SeqLadderModel` and the functions beside it, shared with the Python
API); these are the library entry points `lst predict` and the tests have used from the start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from featcache.text.splits import pad_batch
from featcache.text.t5 import Seq2SeqBackbone

from ...networks.t5 import T5LadderSideNetwork
from ...pretrained import read_model_config
from ...t5.decoding import Encoded, classify, greedy
from .pretrained import Seq2SeqLadderModel


def load_run(run_dir: str | Path, device: str = "cpu",
             backbone: Seq2SeqBackbone | None = None) -> tuple[T5LadderSideNetwork, Seq2SeqBackbone, dict[str, Any]]:
    """The side network of RUN/ and its live backbone (checked against the weights hash it was trained on)."""
    from featcache.loading import resolve_device

    model = Seq2SeqLadderModel(Path(run_dir), read_model_config(run_dir), resolve_device(device), backbone)
    return model.side, model.t5, model.manifest


@torch.no_grad()
def predict_texts(run_dir: str | Path, texts: list[str], pairs: list[str] | None = None, generate: bool = False,
                  max_new_tokens: int = 16, device: str = "cpu", batch_size: int = 32,
                  loaded: tuple | None = None) -> list[dict[str, Any]]:
    """One dict per text: label, label_text and candidate scores; or `generated` text when `generate`."""
    model, backbone, manifest = loaded or load_run(run_dir, device)
    s = manifest["seq2seq"]
    out: list[dict[str, Any]] = []
    for b in range(0, len(texts), batch_size):
        chunk, pair = texts[b:b + batch_size], pairs[b:b + batch_size] if pairs else None
        enc = backbone.tokenizer(chunk, pair, truncation=True, max_length=manifest["max_length"])["input_ids"]
        ids, mask = pad_batch(enc, s["pad_token_id"])
        enc_hidden, enc_out = backbone.encode(ids, mask, s["encoder_layers"])
        mask = mask.bool().to(backbone.device)
        enc = Encoded(model.encode(enc_hidden, mask), mask, enc_out, mask)
        if generate:
            made = greedy(model, backbone, s, enc, max_new_tokens)
            out += [{"generated": backbone.tokenizer.decode(m, skip_special_tokens=True), "generated_ids": m}
                    for m in made]
        else:
            out += classify(model, backbone, s, manifest["task"]["label_names"], enc)
    return out


def predict_lines(run_dir: str | Path, lines: list[str], generate: bool = False, device: str = "auto",
                  max_new_tokens: int = 16) -> list[str]:
    """`lst predict` for T5 runs: one label name (or generated text) per input line; a tab splits a pair."""
    from featcache.loading import resolve_device

    model = Seq2SeqLadderModel(Path(run_dir), read_model_config(run_dir), resolve_device(device)).eval()
    return model.predict(lines, generate=generate, max_new_tokens=max_new_tokens)
