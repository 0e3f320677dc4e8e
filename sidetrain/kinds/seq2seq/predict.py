"""Predictions on raw text with a trained T5 side network: the backbone runs live (no store needed).

Classification scores every candidate label text, as evaluation from the cache does. Free-text
generation cannot run from a cache (the backbone decoder must see the generated tokens): it decodes
greedily, re-running the backbone decoder on the whole prefix at each step (simple, and exact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from featcache.errors import StoreError, expected
from featcache.kinds.seq2seq.backbone import Seq2SeqBackbone, load_seq2seq_backbone, shift_right
from featcache.text.splits import pad_batch

from ...run_files import read_run_config, run_options
from .model import T5LadderSideNetwork, sequence_scores
from .recipe import build_seq2seq_model


def load_run(run_dir: str | Path, device: str = "cpu",
             backbone: Seq2SeqBackbone | None = None) -> tuple[T5LadderSideNetwork, Seq2SeqBackbone, dict[str, Any]]:
    """The side network of RUN/ and its live backbone (checked against the weights hash it was trained on)."""
    run = Path(run_dir)
    config = read_run_config(run)
    manifest = config["store_manifest"]
    if "seq2seq" not in manifest:
        raise StoreError(expected("a run trained on an encoder-decoder (T5) store", f"'{run}' (encoder-only)"))
    backbone = backbone or load_seq2seq_backbone(manifest["backbone"]["name"], "fp32", device)
    if backbone.revision != manifest["backbone"]["revision"]:
        raise StoreError(f"Backbone mismatch: the run was trained on weights {manifest['backbone']['revision']!r}, "
                         f"but {backbone.name} has {backbone.revision!r}.")
    # The live backbone has the LM head already: no store is needed to predict (relative biases: the run's).
    lm_head = backbone.model.get_output_embeddings().weight.detach().float().cpu()
    model = build_seq2seq_model(run_options(config), manifest, {"lm_head": lm_head}, config["decoder_layers"])
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    return model.to(backbone.device).eval(), backbone, manifest


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
        side_enc = model.encode(enc_hidden, mask)
        if generate:
            made = _generate(model, backbone, s, side_enc, enc_out, mask, max_new_tokens)
            out += [{"generated": backbone.tokenizer.decode(m, skip_special_tokens=True), "generated_ids": m}
                    for m in made]
        else:
            out += _classify(model, backbone, s, manifest["task"]["label_names"], side_enc, enc_out, mask)
    return out


def _side_states(model, backbone, s, targets: list[list[int]], row: torch.Tensor, side_enc, enc_out, mask):
    """Backbone decoder teacher-forced on `targets` (rows of examples `row`), then the side decoder:
    the states its LM head reads (N, U, d), and the target mask."""
    dec_ids, dec_mask = shift_right(targets, s["decoder_start_token_id"], s["pad_token_id"])
    dec_hidden, _ = backbone.decode(dec_ids, dec_mask, enc_out[row], mask[row].long(), s["decoder_layers"])
    dec_mask = dec_mask.bool().to(backbone.device)
    return model.decode(dec_hidden * dec_mask[..., None, None], dec_mask, side_enc[row], mask[row]), dec_mask


def _side_logits(model, backbone, s, targets: list[list[int]], row: torch.Tensor, side_enc, enc_out, mask):
    """`_side_states` through the LM head: full-vocabulary logits (N, U, vocab), for a few rows only."""
    states, dec_mask = _side_states(model, backbone, s, targets, row, side_enc, enc_out, mask)
    return model.logits(states), dec_mask


def _classify(model, backbone, s, names: list[str], side_enc, enc_out, mask) -> list[dict[str, Any]]:
    cands = s["candidate_ids"]
    n, c = side_enc.shape[0], len(cands)
    row = torch.arange(n, device=backbone.device).repeat_interleave(c)
    targets = [cands[k] for _ in range(n) for k in range(c)]
    states, dec_mask = _side_states(model, backbone, s, targets, row, side_enc, enc_out, mask)
    target_t, _ = pad_batch(targets, 0)
    scores = sequence_scores(states, model.lm_head, target_t.to(states.device), dec_mask).view(n, c).cpu()
    best = scores.argmax(-1).tolist()
    return [{"label": names[k], "label_text": s["label_texts"][k], "scores": scores[i].tolist()}
            for i, k in enumerate(best)]


def _generate(model, backbone, s, side_enc, enc_out, mask, max_new_tokens: int) -> list[list[int]]:
    n = side_enc.shape[0]
    row = torch.arange(n, device=backbone.device)
    made: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    for _ in range(max_new_tokens):
        # the prefix plus a placeholder: shift_right turns it into [start] + prefix, whose last logits we read
        states, _ = _side_states(model, backbone, s, [m + [s["pad_token_id"]] for m in made], row, side_enc,
                                 enc_out, mask)
        # the vocabulary logits of each row's next position only: (n, vocab), not (n, U, vocab)
        logits = model.logits(states[row, torch.tensor([len(m) for m in made], device=states.device)])
        for i in range(n):
            if not done[i]:
                token = int(logits[i].argmax())
                done[i] = token == s["eos_token_id"]
                if not done[i]:
                    made[i].append(token)
        if all(done):
            break
    return made


def predict_lines(run_dir: str | Path, lines: list[str], generate: bool = False, device: str = "auto",
                  max_new_tokens: int = 16) -> list[str]:
    """`lst predict` for T5 runs: one label name (or generated text) per input line; a tab splits a pair."""
    from featcache.loading import resolve_device

    split = [line.split("\t", 1) for line in lines]
    texts = [p[0] for p in split]
    pairs = [p[1] if len(p) > 1 else "" for p in split] if any(len(p) > 1 for p in split) else None
    out = predict_texts(run_dir, texts, pairs, generate=generate, max_new_tokens=max_new_tokens,
                        device=str(resolve_device(device)))
    return [o["generated"] if generate else o["label"] for o in out]
