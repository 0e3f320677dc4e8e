"""The text part of a store over a T5 (encoder-decoder) backbone: encoder states per example, plus the
backbone decoder's states teacher-forced on target texts. The seq2seq kind stores exactly this; the
vision-language kind stores it beside its image part when the text backbone is a T5.

Per split S the encoder part is laid out as the shared text part (featcache/text/part.py), and
the decoder part sits in S/dec:
    S/dec/hidden      (n_dec_tokens, n_dec_layers, d)  decoder states, teacher-forced on a target text
    S/dec/offsets     (n_rows + 1,) int64              row r = (example r // C, candidate r % C)
    S/dec/candidates  (n_rows,) int32                  the label whose text row r decodes
    S/dec/target_ids  (n_dec_tokens,) int32            the target tokens (decoder inputs are them shifted right)
C is 1 on the train split (the gold label's text) and the number of labels elsewhere (every candidate,
so that evaluation scores candidates from the cache). With `--task generate` (free text: captions, open
answers) the label column holds each row's own target text and C is 1 on every split (the row's own target,
teacher-forced); evaluation then generates (stage 2), and the task is {"type": "generate"}. The frozen LM head (vocab, d) and the block-0
relative-position biases of encoder and decoder are kept under `backbone_weights/`, so stage 2 needs
no backbone at all. States are block outputs before the stack's final layer norm (t5.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..config import ExtractConfig
from ..errors import DatasetError, StoreError, expected
from ..fidelity import measure, sample_indices, storage_error
from ..plan import ROOT, KindPlan, PartPlan, RowsFn, check_layers
from .backbone import load_tokenizer
from .part import text_plan
from .splits import pad_batch
from .t5 import (
    TRAIN_SPLIT,
    Seq2SeqBackbone,
    candidate_ids,
    check_precision,
    label_texts,
    load_seq2seq_backbone,
    plan_rows,
    shift_right,
    store_dtype_for_t5,
)

DECODER = "dec"
GENERATE = "generate"  # --task generate: each row's label column is its own target text


def target_texts(texts: list[str], tokenizer, eos: int) -> list[list[int]]:
    """Free-text targets: each text's tokens then EOS (texts that tokenise alike are allowed here)."""
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) + [eos] for t in texts]
    empty = [t for t, x in zip(texts, ids) if len(x) == 1]
    if empty:
        raise DatasetError(expected("a target text with at least one token on every row", f"{empty[0]!r}"))
    return ids


def t5_plan(cfg: ExtractConfig, config: Any, backbone: Seq2SeqBackbone | None) -> KindPlan:
    """What a T5 text part stores (encoder and decoder parts of every split, the `seq2seq` manifest entry);
    plan.state holds what `t5_rows` and `t5_fidelity` read."""
    check_precision(cfg.precision)
    store_dtype = store_dtype_for_t5(cfg.store_dtype)
    tokenizer = backbone.tokenizer if backbone is not None else load_tokenizer(cfg.model)
    n_enc, n_dec = int(config.num_layers), int(config.num_decoder_layers)
    layers = check_layers(cfg.layers, min(n_enc, n_dec) if cfg.layers is not None else n_enc)
    dec_layers = list(range(n_dec + 1)) if cfg.layers is None else layers
    d = int(config.d_model)
    plan = text_plan(cfg, tokenizer, config, layers, d, n_enc)
    plan.store_dtype = store_dtype
    task = plan.manifest["task"]
    free = task["type"] == GENERATE
    if task["type"] not in ("classification", GENERATE):
        raise DatasetError(expected("a classification task for T5 (labels cast as words), or --task generate",
                                    task["type"], "Regression targets as text (STS-B) are not supported yet."))
    if free and cfg.label_text is not None:
        raise DatasetError(expected("--label-text (a closed label set, scored) or --task generate (free text), not "
                                    "both", "both", "Drop one."))
    texts = task["label_names"] if free else label_texts(task["label_names"], cfg.dataset, cfg.label_text)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else pad
    cands = target_texts(texts, tokenizer, eos) if free else candidate_ids(texts, tokenizer, eos)
    rows = {}
    for name, split in plan.state.items():
        if free and split.labels is None:
            raise DatasetError(expected(f"a target (the label column) on every row of split '{name}' for --task "
                                        "generate", "an unlabelled split"))
        rows[name] = plan_rows(len(split.input_ids), split.labels, free or name == TRAIN_SPLIT, cands)
        if free:  # the targets are the rows' own texts: no label set
            plan.parts[name][ROOT].columns["labels"] = np.ones(len(split.labels), dtype=np.int64)
        r = rows[name]
        plan.parts[name][DECODER] = PartPlan(r.offsets, dec_layers, d, {
            "offsets": r.offsets, "candidates": r.candidates,
            "target_ids": np.asarray([t for x in r.targets for t in x], dtype=np.int32)})
        plan.split_facts[name].update(decoder_rows=len(r.candidates), decoder_tokens=r.n_tokens,
                                      candidates_per_example=r.per_example)
    plan.request.update(decoder_layers=dec_layers, label_texts=texts)
    plan.manifest["backbone"]["is_encoder_decoder"] = True
    plan.manifest["tokenizer"]["pad_token_id"] = pad
    if free:
        plan.manifest["task"] = {"type": GENERATE, "label_names": [], "num_labels": 1}
        texts, cands = [], []
    plan.manifest["seq2seq"] = {
        "model_type": config.model_type, "encoder_layers": layers, "decoder_layers": dec_layers,
        "num_encoder_layers": n_enc, "num_decoder_layers": n_dec, "label_texts": texts, "candidate_ids": cands,
        "targets": "text" if free else "labels",
        "decoder_start_token_id": int(start), "pad_token_id": int(pad), "eos_token_id": int(eos),
        "train_split": TRAIN_SPLIT,
        "scale_decoder_outputs": bool(getattr(config, "scale_decoder_outputs",
                                              getattr(config, "tie_word_embeddings", True))),
        "states": "block outputs before the final layer norm; 0 = embedding output",
        "lm_head": "backbone_weights/lm_head (vocab, d) float32"}
    plan.state = {"splits": plan.state, "rows": rows, "start": int(start), "pad": int(pad)}
    return plan


def t5_rows(state: dict[str, Any], parts: dict[str, PartPlan], backbone: Seq2SeqBackbone, split: str,
            part: str) -> RowsFn:
    """The rows of the encoder part ('') or the decoder part ('dec') of one split. `state`: t5_plan's
    plan.state; `parts`: the split's planned parts."""
    tokenised, rp = state["splits"][split], state["rows"][split]
    start, pad = state["start"], state["pad"]
    layers, dec_layers = parts[ROOT].layers, parts[DECODER].layers

    def encoder_rows(items: list[int]) -> list[torch.Tensor]:
        ids, mask = pad_batch([tokenised.input_ids[i] for i in items], pad)
        states = backbone.encode(ids, mask, layers)[0].cpu()  # (B, T, L, d)
        return [states[r, :len(tokenised.input_ids[i])] for r, i in enumerate(items)]

    def decoder_rows(items: list[int]) -> list[torch.Tensor]:
        examples = sorted({i // rp.per_example for i in items})
        ids, mask = pad_batch([tokenised.input_ids[e] for e in examples], pad)
        _, enc_out = backbone.encode(ids, mask, layers[:1])  # (B, T, d)
        pick = torch.tensor([examples.index(i // rp.per_example) for i in items])
        dec_ids, dec_mask = shift_right([rp.targets[i] for i in items], start, pad)
        states, _ = backbone.decode(dec_ids, dec_mask, enc_out[pick.to(enc_out.device)], mask[pick], dec_layers)
        states = states.cpu()
        return [states[r, :len(rp.targets[i])] for r, i in enumerate(items)]

    if part == ROOT:
        return encoder_rows
    if part == DECODER:
        return decoder_rows
    raise StoreError(expected(f"a part '' or '{DECODER}' of a T5 text part", repr(part)))


def t5_fidelity(cfg: ExtractConfig, state: dict[str, Any], parts: dict[str, PartPlan], store_dtype: str,
                backbone: Seq2SeqBackbone) -> dict[str, Any] | None:
    """The text encoder's `fidelity` entry for the encoder states, plus the decoder states' storage error
    (on the first split; `parts`: its planned parts)."""
    name, tokenised = next(iter(state["splits"].items()))
    rp, start, pad = state["rows"][name], state["start"], state["pad"]
    picks = sample_indices(len(tokenised.input_ids), cfg.error_sample)
    if not picks:
        return None
    layers, dec_layers = parts[ROOT].layers, parts[DECODER].layers
    ids = [tokenised.input_ids[i] for i in picks]
    result = measure(backbone, ids, [tokenised.token_type_ids[i] for i in picks], layers, store_dtype,
                     cfg.batch_size, load_fp32=lambda: load_seq2seq_backbone(backbone.name, "fp32",
                                                                             str(backbone.device)))
    targets = [rp.targets[i * rp.per_example] for i in picks]  # each example's first row
    enc_ids, enc_mask = pad_batch(ids, pad)
    _, enc_out = backbone.encode(enc_ids, enc_mask, layers[:1])
    dec_ids, dec_mask = shift_right(targets, start, pad)
    states, _ = backbone.decode(dec_ids, dec_mask, enc_out, enc_mask, dec_layers)
    result["decoder_storage_error"] = storage_error(states[dec_mask.bool().to(states.device)].cpu())
    result["split"] = name
    return result


def t5_frozen_weights(backbone: Seq2SeqBackbone) -> dict[str, np.ndarray]:
    """The LM head and both stacks' block-0 relative position biases (stage 2 needs no backbone)."""
    m = backbone.model
    weights = {"lm_head": m.get_output_embeddings().weight.detach().float().cpu().numpy()}
    for part in ("encoder", "decoder"):
        bias = getattr(m, part).block[0].layer[0].SelfAttention.relative_attention_bias.weight
        weights[f"{part}_relative_bias"] = bias.detach().float().cpu().numpy()
    return weights


def finish_t5_manifest(manifest: dict[str, Any]) -> None:
    manifest["decoder_bytes_per_token"] = manifest["parts"][DECODER]["bytes_per_token"]
    for facts in manifest["splits"].values():
        facts["decoder_shards"] = facts["parts"][DECODER]["shards"]
