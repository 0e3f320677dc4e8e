"""Stage 1 for encoder-decoder backbones (T5, the paper's setting).

Per split S the encoder part has the encoder-only layout (so `SplitReader` reads it unchanged), and
the decoder part sits in the subgroup S/dec:
    S/hidden          (n_tokens, n_enc_layers, d)      encoder states over the input, token-major
    S/offsets, S/input_ids, S/token_type_ids, S/labels, S/shard_done   as for encoder-only stores
    S/dec/hidden      (n_dec_tokens, n_dec_layers, d)  decoder states, teacher-forced on a target text
    S/dec/offsets     (n_rows + 1,) int64              row r = (example r // C, candidate r % C)
    S/dec/candidates  (n_rows,) int32                  the label whose text row r decodes
    S/dec/target_ids  (n_dec_tokens,) int32            the target tokens (decoder inputs are them shifted right)
    S/dec/shard_done  (n_dec_shards,) uint8
C is 1 on the train split (the gold label's text) and the number of labels elsewhere (every candidate,
so that evaluation scores candidates from the cache). The root group `backbone_weights` holds the
frozen pieces stage 2 needs without the backbone: `lm_head` (vocab, d) float32 and the block-0
relative-position biases of encoder and decoder (buckets, heads).

States are taken before the stack's final layer norm (DESIGN section 1): transformers' last
`hidden_states` entry is `final_layer_norm(last block output)`, so we hook the blocks instead.
Layer 0 is the embedding output, layer i the output of block i.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from . import store as S
from .backbone import TORCH_DTYPES, Backbone, resolve_device, weights_hash
from .errors import BackboneError, DatasetError, StoreError, expected
from .progress import progress_bar

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"  # gets the gold target only; every other split gets every candidate
# T5's own GLUE target words (t5.data.glue_utils), keyed by the task folder name, lower-case, no '-'/'_'.
GLUE_LABEL_TEXTS: dict[str, dict[str, str]] = {
    "sst2": {"0": "negative", "1": "positive"},
    "cola": {"0": "unacceptable", "1": "acceptable"},
    "mrpc": {"0": "not_equivalent", "1": "equivalent"},
    "qqp": {"0": "not_duplicate", "1": "duplicate"},
    "qnli": {"entailment": "entailment", "not_entailment": "not_entailment"},
    "rte": {"entailment": "entailment", "not_entailment": "not_entailment"},
    "wnli": {"0": "not_entailment", "1": "entailment"},
    "mnli": {"entailment": "entailment", "neutral": "neutral", "contradiction": "contradiction"},
}
FP16_REASON = ("T5's activations exceed float16's range (65504) and overflow to inf/NaN "
               "(a known T5 property; its pre-training used bfloat16)")


def is_encoder_decoder(config) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


@dataclass
class Seq2SeqBackbone(Backbone):
    """A frozen encoder-decoder (T5ForConditionalGeneration) in eval mode, with its tokenizer."""

    @property
    def hidden_size(self) -> int:
        return int(self.config.d_model)

    @property
    def num_encoder_layers(self) -> int:
        return len(self.model.encoder.block)

    @property
    def num_decoder_layers(self) -> int:
        return len(self.model.decoder.block)

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, mask: torch.Tensor,
               layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids and mask -> states (B, T, n_layers, d) float32, encoder output (B, T, d)."""
        ids, mask = input_ids.to(self.device), mask.to(self.device)
        states, out = _stack_states(self.model.encoder, input_ids=ids, attention_mask=mask)
        return torch.stack([states[i] for i in layers], dim=2).float(), out

    @torch.no_grad()
    def decode(self, decoder_input_ids: torch.Tensor, decoder_mask: torch.Tensor, encoder_out: torch.Tensor,
               encoder_mask: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced decoder: (N, U) ids -> states (N, U, n_layers, d) float32, output (N, U, d)."""
        states, out = _stack_states(self.model.decoder, input_ids=decoder_input_ids.to(self.device),
                                    attention_mask=decoder_mask.to(self.device),
                                    encoder_hidden_states=encoder_out.to(self.device),
                                    encoder_attention_mask=encoder_mask.to(self.device))
        return torch.stack([states[i] for i in layers], dim=2).float(), out

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None, layers: list[int]) -> torch.Tensor:
        """The encoder-only Backbone interface: encoder states (B, T, n_layers, d)."""
        return self.encode(input_ids, attention_mask, layers)[0]


def _stack_states(stack: torch.nn.Module, **kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[embedding output, block 1 output, ..., block L output] before the final layer norm, and the
    stack's output. Hooks, because transformers' last hidden_states entry has the final norm applied."""
    states: list[torch.Tensor] = []
    hooks = [stack.block[0].register_forward_pre_hook(lambda m, args: states.append(args[0]))]
    hooks += [b.register_forward_hook(lambda m, args, out: states.append(out[0])) for b in stack.block]
    try:
        out = stack(**kwargs, use_cache=False, return_dict=True).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    return states, out


def load_seq2seq_backbone(name_or_path: str, precision: str = "fp32", device: str = "auto") -> Seq2SeqBackbone:
    """Load a frozen T5ForConditionalGeneration (the LM head is needed), refusing fp16 and int8 compute."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    check_precision(precision)
    dev = resolve_device(device)
    local = Path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, dtype=TORCH_DTYPES[precision])
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"Could not load backbone '{name_or_path}': {first}") from None
    if getattr(model.config, "model_type", "") != "t5":
        raise BackboneError(expected("a T5 encoder-decoder (the family the seq2seq side network is built from)",
                                     f"model_type '{model.config.model_type}'"))
    model.eval().requires_grad_(False).to(dev)
    revision = weights_hash(local) if local.is_dir() else str(getattr(model.config, "_commit_hash", None) or "unknown")
    return Seq2SeqBackbone(model, tokenizer, str(local.resolve()) if local.exists() else name_or_path,
                           revision, precision, dev)


def check_precision(precision: str) -> None:
    if precision == "fp16":
        raise BackboneError(expected("--precision fp32 or bf16 for T5", "fp16", f"{FP16_REASON}."))
    if precision not in ("fp32", "bf16"):
        raise BackboneError(expected("--precision fp32 or bf16 for T5", precision))


def store_dtype_for_t5(asked: str) -> str:
    """fp16 (the encoder-only default) becomes bf16 with a warning; bf16 and fp32 are kept."""
    if asked == "fp16":
        log.warning("Storing T5 activations as bf16 instead of fp16: %s.", FP16_REASON)
        return "bf16"
    if asked not in ("bf16", "fp32"):
        raise StoreError(expected("--store-dtype bf16 or fp32 for T5", asked))
    return asked


def label_texts(label_names: list[str], dataset: str, override: str | dict[str, str] | None) -> list[str]:
    """One target text per label, in label order: --label-text JSON, else GLUE words, else the names."""
    if isinstance(override, str):
        try:
            override = json.loads(Path(override).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DatasetError(expected("--label-text: a JSON file mapping label -> text",
                                        f"'{override}' ({type(err).__name__})")) from None
    mapping = {str(k): str(v) for k, v in (override or {}).items()}
    if not mapping:
        task = Path(dataset).name.lower().replace("-", "").replace("_", "")
        glue = GLUE_LABEL_TEXTS.get(task, {})
        mapping = glue if set(label_names) <= set(glue) else {}
    missing = [n for n in label_names if override and n not in mapping]
    if missing:
        raise DatasetError(expected(f"a text for every label in --label-text (labels {label_names})",
                                    f"none for {missing}"))
    return [mapping.get(n, n) for n in label_names]


def candidate_ids(texts: list[str], tokenizer, eos_id: int) -> list[list[int]]:
    """Target token ids of each label text, ending in EOS; refuses texts that tokenise alike."""
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) + [eos_id] for t in texts]
    if len({tuple(x) for x in ids}) < len(ids):
        raise DatasetError(expected("label texts that tokenise differently", texts, "Set them with --label-text."))
    return ids


@dataclass
class Seq2SeqPlan:
    """Rows to decode in one split: row r is example r // per_example with candidate candidates[r]."""

    per_example: int
    candidates: np.ndarray  # (n_rows,) int32
    targets: list[list[int]]  # per row
    offsets: np.ndarray  # (n_rows + 1,) int64

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])


def plan_rows(n_examples: int, labels: np.ndarray | None, gold_only: bool, cands: list[list[int]]) -> Seq2SeqPlan:
    if gold_only:
        if labels is None:
            raise DatasetError(expected(f"labels on split '{TRAIN_SPLIT}' (its decoder runs on the gold target)",
                                        "an unlabelled split"))
        rows = labels.astype(np.int32)
    else:
        rows = np.tile(np.arange(len(cands), dtype=np.int32), n_examples)
    targets = [cands[c] for c in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in targets], out=offsets[1:])
    return Seq2SeqPlan(1 if gold_only else len(cands), rows, targets, offsets)


def shift_right(targets: list[list[int]], start_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs [start] + target[:-1], right-padded: ids (N, U), mask (N, U)."""
    width = max(len(t) for t in targets)
    ids = torch.full((len(targets), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(targets), width), dtype=torch.long)
    for r, t in enumerate(targets):
        ids[r, 0] = start_id
        ids[r, 1:len(t)] = torch.tensor(t[:-1], dtype=torch.long)
        mask[r, :len(t)] = 1
    return ids, mask


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[r, :len(x)] = 1
    return ids, mask


def extract_seq2seq(cfg, backbone: Seq2SeqBackbone | None = None) -> dict[str, Any]:
    """`featcache.extract` for encoder-decoder backbones; returns the final manifest."""
    from transformers import AutoConfig, AutoTokenizer

    from .writer import _shard_tokens, open_for_write, plan_splits, preflight

    check_precision(cfg.precision)
    store_dtype = store_dtype_for_t5(cfg.store_dtype)
    tokenizer = backbone.tokenizer if backbone else AutoTokenizer.from_pretrained(cfg.model)
    config = backbone.config if backbone else AutoConfig.from_pretrained(cfg.model)
    n_enc, n_dec = int(config.num_layers), int(config.num_decoder_layers)
    layers = list(range(n_enc + 1)) if cfg.layers is None else sorted(set(cfg.layers))
    if layers[0] < 0 or layers[-1] > min(n_enc, n_dec):
        raise StoreError(expected(f"--layers within 0..{min(n_enc, n_dec)} (0 = embedding output)", layers))
    dec_layers = list(range(n_dec + 1)) if cfg.layers is None else layers
    plans, meta = plan_splits(cfg, tokenizer)
    if meta["task"]["type"] != "classification":
        raise DatasetError(expected("a classification task for T5 (labels cast as words)", meta["task"]["type"],
                                    "Regression targets as text (STS-B) are not supported yet."))
    texts = label_texts(meta["task"]["label_names"], cfg.dataset, getattr(cfg, "label_text", None))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else pad
    cands = candidate_ids(texts, tokenizer, eos)
    rows = {n: plan_rows(len(p.input_ids), p.labels, n == TRAIN_SPLIT, cands) for n, p in plans.items()}

    d = int(config.d_model)
    itemsize = np.dtype(S.ZARR_DTYPES[store_dtype]).itemsize
    enc_bpt, dec_bpt = len(layers) * d * itemsize, len(dec_layers) * d * itemsize
    enc_shard = _shard_tokens(cfg, enc_bpt)
    dec_shard = _shard_tokens(cfg, dec_bpt)
    summary = preflight(plans, layers, enc_bpt, enc_shard)
    dec_tokens = sum(r.n_tokens for r in rows.values())
    log.info("%s; decoder: %d rows, %d tokens, ~%.1f MiB", summary["text"],
             sum(len(r.candidates) for r in rows.values()), dec_tokens, dec_tokens * dec_bpt / 2**20)

    backbone = backbone or load_seq2seq_backbone(cfg.model, cfg.precision, cfg.device)
    request = {"model": backbone.name, "revision": backbone.revision,
               "dataset_fingerprint": meta["dataset"]["fingerprint"], "splits": sorted(plans), "max_length": cfg.max_length, "layers": layers, "decoder_layers": dec_layers,
               "store_dtype": store_dtype, "precision": cfg.precision, "shard_tokens": enc_shard,
               "decoder_shard_tokens": dec_shard, "chunk_tokens": cfg.chunk_tokens,
               "columns": meta["dataset"]["columns"], "task": meta["task"]["type"], "label_texts": texts}
    group, resuming = open_for_write(cfg, request)
    seq2seq = {"model_type": config.model_type, "encoder_layers": layers, "decoder_layers": dec_layers,
               "num_encoder_layers": n_enc, "num_decoder_layers": n_dec, "label_texts": texts,
               "candidate_ids": cands, "decoder_start_token_id": int(start), "pad_token_id": int(pad),
               "eos_token_id": int(eos), "train_split": TRAIN_SPLIT,
               "scale_decoder_outputs": bool(getattr(config, "scale_decoder_outputs",
                                                     getattr(config, "tie_word_embeddings", True))),
               "states": "block outputs before the final layer norm; 0 = embedding output",
               "lm_head": "backbone_weights/lm_head (vocab, d) float32"}
    manifest = S.new_manifest(
        request=request, layout_complete=False,  # the writer's rule: resume only a completely laid-out store
        backbone={"name": backbone.name, "revision": backbone.revision, "model_type": config.model_type,
                  "num_layers": n_enc, "hidden_size": d, "is_encoder_decoder": True, "config": config.to_dict()},
        tokenizer={"name": backbone.name, "vocab_size": len(tokenizer), "pad_token_id": pad},
        layers=layers, hidden_size=d, precision=cfg.precision, store_dtype=store_dtype,
        max_length=cfg.max_length, bytes_per_token=enc_bpt, decoder_bytes_per_token=dec_bpt, seq2seq=seq2seq, **meta,
        splits={n: {"examples": len(p.input_ids), "tokens": p.n_tokens, "truncated": p.truncated,
                    "rejected_rows": p.rejected_rows, "labelled": p.labels is not None,
                    "shards": math.ceil(p.n_tokens / enc_shard), "decoder_rows": len(rows[n].candidates),
                    "decoder_tokens": rows[n].n_tokens, "candidates_per_example": rows[n].per_example,
                    "decoder_shards": math.ceil(rows[n].n_tokens / dec_shard)} for n, p in plans.items()},
        extract_config={**{k: v for k, v in asdict(cfg).items() if k != "overwrite"}, "store_dtype": store_dtype},
    )
    if resuming:  # measured once, when the store was laid out
        if "fidelity" in group.attrs[S.MANIFEST_KEY]:
            manifest["fidelity"] = group.attrs[S.MANIFEST_KEY]["fidelity"]
    else:
        fidelity = _fidelity(cfg, plans, rows, backbone, layers, dec_layers, store_dtype, start, pad)
        if fidelity is not None:
            manifest["fidelity"] = fidelity
        group.attrs[S.MANIFEST_KEY] = manifest
        _write_weights(group, backbone)
        for name, plan in plans.items():
            _create_split(group, plan, rows[name], len(layers), len(dec_layers), d, store_dtype, cfg.chunk_tokens,
                          enc_shard, dec_shard)
    manifest["layout_complete"] = True
    group.attrs[S.MANIFEST_KEY] = manifest
    total = summary["tokens"] + dec_tokens
    with ThreadPoolExecutor(max_workers=1) as writer, progress_bar("extract", total, unit="tok") as bar:
        pending: list[Future] = []
        for name, plan in plans.items():
            g = group[name]

            def enc_rows(items: list[int], plan=plan) -> list[torch.Tensor]:
                ids, mask = pad_batch([plan.input_ids[i] for i in items], pad)
                states, _ = backbone.encode(ids, mask, layers)  # (B, T, L, d)
                return [states[r, :len(plan.input_ids[i])] for r, i in enumerate(items)]

            def dec_rows(items: list[int], plan=plan, rp=rows[name]) -> list[torch.Tensor]:
                examples = sorted({i // rp.per_example for i in items})
                ids, mask = pad_batch([plan.input_ids[e] for e in examples], pad)
                _, enc_out = backbone.encode(ids, mask, layers[:1])  # (B, T, d)
                pick = torch.tensor([examples.index(i // rp.per_example) for i in items])
                dec_ids, dec_mask = shift_right([rp.targets[i] for i in items], start, pad)
                states, _ = backbone.decode(dec_ids, dec_mask, enc_out[pick.to(enc_out.device)],
                                            mask[pick], dec_layers)
                return [states[r, :len(rp.targets[i])] for r, i in enumerate(items)]

            lengths = [len(x) for x in plan.input_ids]
            _fill(g, "hidden", plan.offsets, lengths, enc_shard, enc_rows, store_dtype, cfg.batch_size,
                  writer, pending, bar)
            _fill(g["dec"], "hidden", rows[name].offsets, [len(t) for t in rows[name].targets], dec_shard,
                  dec_rows, store_dtype, cfg.batch_size, writer, pending, bar)
        for f in pending:
            f.result()
    manifest["complete"] = True
    group.attrs[S.MANIFEST_KEY] = manifest
    return manifest


def _fidelity(cfg, plans: dict, rows: dict[str, Seq2SeqPlan], backbone: Seq2SeqBackbone, layers: list[int],
              dec_layers: list[int], store_dtype: str, start: int, pad: int) -> dict[str, Any] | None:
    """The writer's `fidelity` entry for the encoder states, plus the storage error of the decoder states."""
    from .fidelity import measure, sample_indices, storage_error

    name, plan = next(iter(plans.items()))
    picks = sample_indices(len(plan.input_ids), getattr(cfg, "error_sample", 32))
    if not picks:
        return None
    ids = [plan.input_ids[i] for i in picks]
    result = measure(backbone, ids, [plan.token_type_ids[i] for i in picks], layers, store_dtype, cfg.batch_size,
                     load_fp32=lambda: load_seq2seq_backbone(backbone.name, "fp32", str(backbone.device)))
    targets = [rows[name].targets[i * rows[name].per_example] for i in picks]  # each example's first row
    enc_ids, enc_mask = pad_batch(ids, pad)
    _, enc_out = backbone.encode(enc_ids, enc_mask, layers[:1])
    dec_ids, dec_mask = shift_right(targets, start, pad)
    states, _ = backbone.decode(dec_ids, dec_mask, enc_out, enc_mask, dec_layers)
    result["decoder_storage_error"] = storage_error(states[dec_mask.bool().to(states.device)].cpu())
    result["split"] = name
    return result


def _write_weights(group: zarr.Group, backbone: Seq2SeqBackbone) -> None:
    """The frozen LM head and block-0 relative biases: stage 2 then needs no backbone at all."""
    w = group.require_group("backbone_weights")
    m = backbone.model
    w.create_array("lm_head", data=m.get_output_embeddings().weight.detach().float().cpu().numpy(), overwrite=True)
    for part in ("encoder", "decoder"):
        bias = getattr(m, part).block[0].layer[0].SelfAttention.relative_attention_bias.weight
        w.create_array(f"{part}_relative_bias", data=bias.detach().float().cpu().numpy(), overwrite=True)


def _create_split(group: zarr.Group, plan, rows: Seq2SeqPlan, n_enc: int, n_dec: int, d: int, store_dtype: str,
                  chunk_tokens: int, enc_shard: int, dec_shard: int) -> None:
    g = group.require_group(plan.name)
    dtype = S.ZARR_DTYPES[store_dtype]
    n = max(plan.n_tokens, 1)
    g.create_array("hidden", shape=(plan.n_tokens, n_enc, d), dtype=dtype, chunks=(min(chunk_tokens, n), n_enc, d),
                   shards=(enc_shard, n_enc, d), compressors=None, fill_value=0, overwrite=True)
    g.create_array("offsets", data=plan.offsets, overwrite=True)
    g.create_array("input_ids", data=np.asarray([t for x in plan.input_ids for t in x], dtype=np.int32),
                   overwrite=True)
    g.create_array("token_type_ids", data=np.asarray([t for x in plan.token_type_ids for t in x], dtype=np.int8),
                   overwrite=True)
    if plan.labels is not None:
        g.create_array("labels", data=plan.labels, overwrite=True)
    g.create_array("shard_done", shape=(max(math.ceil(plan.n_tokens / enc_shard), 1),), dtype="uint8", chunks=(1,),
                   fill_value=0, overwrite=True)
    dg = g.require_group("dec")
    nd = max(rows.n_tokens, 1)
    dg.create_array("hidden", shape=(rows.n_tokens, n_dec, d), dtype=dtype, chunks=(min(chunk_tokens, nd), n_dec, d),
                    shards=(dec_shard, n_dec, d), compressors=None, fill_value=0, overwrite=True)
    dg.create_array("offsets", data=rows.offsets, overwrite=True)
    dg.create_array("candidates", data=rows.candidates, overwrite=True)
    dg.create_array("target_ids", data=np.asarray([t for x in rows.targets for t in x], dtype=np.int32),
                    overwrite=True)
    dg.create_array("shard_done", shape=(max(math.ceil(rows.n_tokens / dec_shard), 1),), dtype="uint8",
                    chunks=(1,), fill_value=0, overwrite=True)


def _fill(g: zarr.Group, name: str, offsets: np.ndarray, lengths: list[int], shard_tokens: int,
          compute: Callable[[list[int]], list[torch.Tensor]], store_dtype: str, batch_size: int,
          writer: ThreadPoolExecutor, pending: list[Future], bar) -> None:
    """Every shard not yet done: compute the items overlapping it (length-sorted batches) into a
    buffer, then write it whole, once, and mark it done (items straddling a boundary run twice)."""
    array, done = g[name], g["shard_done"][:]
    n_tokens = int(offsets[-1])
    for k in range(math.ceil(n_tokens / shard_tokens)):
        lo, hi = k * shard_tokens, min((k + 1) * shard_tokens, n_tokens)
        if done[k]:
            bar.advance(hi - lo)
            continue
        buffer = np.zeros((hi - lo, *array.shape[1:]), dtype=S.ZARR_DTYPES[store_dtype])
        first = int(np.searchsorted(offsets, lo, side="right")) - 1
        last = int(np.searchsorted(offsets, hi, side="left"))
        members = sorted(range(first, last), key=lambda i: lengths[i])
        for b in range(0, len(members), batch_size):
            batch = members[b:b + batch_size]
            for i, states in zip(batch, compute(batch)):
                a, z = int(offsets[i]), int(offsets[i + 1])
                s, e = max(a, lo), min(z, hi)
                buffer[s - lo:e - lo] = S.encode(states[s - a:e - a], store_dtype)
        while pending:  # at most one shard in flight: bounded memory, errors surface here
            pending.pop().result()
        pending.append(writer.submit(_write_shard, g, name, k, lo, hi, buffer))
        bar.advance(hi - lo)


def _write_shard(g: zarr.Group, name: str, k: int, lo: int, hi: int, buffer: np.ndarray) -> None:
    g[name][lo:hi] = buffer  # the whole shard in one write
    g["shard_done"][k] = 1  # recorded only after the data is in place
