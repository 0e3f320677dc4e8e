"""Stage 2 for encoder-decoder stores (T5): batches, loss and candidate scoring for the shared training loop.

`sidetrain.train.train()` takes its Recipe from here when the store's manifest has a `seq2seq` block. Training
is teacher-forced cross-entropy on the gold target's text; a classification prediction scores every
candidate label text (sum of log-probabilities) and picks the best, from the cache on the eval splits.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import zarr

from featcache import store as S
from featcache.errors import StoreError, TrainConfigError, expected
from featcache.reader import SplitReader, StoreReader
from featcache.seq2seq import Seq2SeqBackbone, load_seq2seq_backbone, shift_right
from featcache.store import check_match

from ... import metrics as M
from ...data import length_bucketed_batches, should_preload
from .model import T5LadderSideNetwork, sequence_scores, target_loss

log = logging.getLogger(__name__)


@dataclass
class Seq2SeqBatch:
    enc_hidden: torch.Tensor | None  # (B, T, n_enc_layers, d) float32
    enc_mask: torch.Tensor  # (B, T) bool
    dec_hidden: torch.Tensor | None  # (N, U, n_dec_layers, d) float32; N = B * candidates per example
    dec_mask: torch.Tensor  # (N, U) bool
    targets: torch.Tensor  # (N, U) long, pad 0
    row_example: torch.Tensor  # (N,) long: the batch row each decoder row reads
    labels: torch.Tensor | None  # (B,)

    def to(self, device: torch.device) -> Seq2SeqBatch:
        move = (lambda t: None if t is None else t.to(device))
        return Seq2SeqBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


class DecoderSplit:
    """S/dec of a seq2seq store: rows (example, candidate) of teacher-forced decoder states."""

    def __init__(self, group: zarr.Group, split: SplitReader, manifest: dict[str, Any]) -> None:
        done = group["shard_done"][:]
        if group["hidden"].shape[0] and not done.all():
            raise StoreError(f"Split '{split.name}' has {int((done == 0).sum())} unwritten decoder shards; "
                             "re-run the extraction to complete it.")
        self.store_dtype = manifest["store_dtype"]
        self.offsets = group["offsets"][:]
        self.candidates = group["candidates"][:].astype(np.int64)
        self.target_ids = group["target_ids"][:].astype(np.int64)
        self.per_example = len(self.candidates) // max(len(split), 1)
        self._hidden = group["hidden"]
        self._memory: np.ndarray | None = None

    def load(self) -> DecoderSplit:
        if self._memory is None:
            self._memory = self._hidden[:]
        return self

    def rows(self, examples: np.ndarray) -> np.ndarray:
        c = self.per_example
        return (np.asarray(examples)[:, None] * c + np.arange(c)[None, :]).reshape(-1)

    def token_part(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Targets (N, U), mask (N, U) and the flat token index of `rows`."""
        lengths = self.offsets[rows + 1] - self.offsets[rows]
        mask = torch.from_numpy(np.arange(int(lengths.max()))[None, :] < lengths[:, None])
        index = np.concatenate([np.arange(self.offsets[r], self.offsets[r + 1]) for r in rows])
        targets = torch.zeros(mask.shape, dtype=torch.long)
        targets[mask] = torch.from_numpy(self.target_ids[index])
        return targets, mask, index

    def hidden(self, rows: np.ndarray, index: np.ndarray, mask: torch.Tensor) -> torch.Tensor:
        """Decoder states of `rows` (N, U, n_layers, d), zero on padding; from RAM or one read per run of rows."""
        if self._memory is not None:
            flat = self._memory[index]
        else:
            flat = np.concatenate([self._hidden[a:b] for a, b in _runs(self.offsets[rows], self.offsets[rows + 1])])
        flat_t = S.decode(flat, self.store_dtype)
        out = torch.zeros((*mask.shape, *flat_t.shape[1:]), dtype=torch.float32)
        out[mask] = flat_t
        return out


def _runs(starts: np.ndarray, ends: np.ndarray) -> list[tuple[int, int]]:
    """Token ranges of consecutive rows merged (an example's candidates are adjacent in the store)."""
    runs = [[int(starts[0]), int(ends[0])]]
    for a, b in zip(starts[1:], ends[1:]):
        if a == runs[-1][1]:
            runs[-1][1] = int(b)
        else:
            runs.append([int(a), int(b)])
    return [(a, b) for a, b in runs]


def open_decoder(store: StoreReader, name: str) -> DecoderSplit:
    group = zarr.open_group(store.path, mode="r")[name]["dec"]
    return DecoderSplit(group, store.split(name), store.manifest)


class CachedSeq2Seq:
    """Encoder and decoder states from the store; in RAM when `preload` (None: when the split fits)."""

    def __init__(self, split: SplitReader, dec: DecoderSplit, preload: bool | None = None) -> None:
        keep = should_preload(split, preload)  # decoder rows are a few tokens each: they follow the encoder
        self.preloaded = keep
        self.split = split.load() if keep else split
        self.dec = dec.load() if keep else dec

    def __call__(self, idx: np.ndarray) -> Seq2SeqBatch:
        enc = self.split.batch(idx)
        rows = self.dec.rows(idx)
        targets, dmask, index = self.dec.token_part(rows)
        row_example = torch.arange(len(idx)).repeat_interleave(self.dec.per_example)
        return Seq2SeqBatch(enc.hidden, enc.mask, self.dec.hidden(rows, index, dmask), dmask, targets, row_example,
                            enc.labels)


class OnlineSeq2Seq:
    """Classic LST: the live backbone recomputes encoder and teacher-forced decoder states per batch."""

    def __init__(self, split: SplitReader, dec: DecoderSplit, backbone: Seq2SeqBackbone,
                 manifest: dict[str, Any]) -> None:
        self.split, self.dec, self.backbone = split, dec, backbone
        s = manifest["seq2seq"]
        self.enc_layers, self.dec_layers = s["encoder_layers"], s["decoder_layers"]
        self.start, self.pad = s["decoder_start_token_id"], s["pad_token_id"]

    def __call__(self, idx: np.ndarray) -> Seq2SeqBatch:
        ids = self.split.token_batch(idx)
        rows = self.dec.rows(idx)
        targets, dmask, _ = self.dec.token_part(rows)
        row_example = torch.arange(len(idx)).repeat_interleave(self.dec.per_example)
        enc_hidden, enc_out = self.backbone.encode(ids.input_ids, ids.mask.long(), self.enc_layers)
        dec_ids, dec_in_mask = shift_right([t[m].tolist() for t, m in zip(targets, dmask)], self.start, self.pad)
        dec_hidden, _ = self.backbone.decode(dec_ids, dec_in_mask, enc_out[row_example.to(enc_out.device)],
                                             ids.mask[row_example].long(), self.dec_layers)
        # padded positions as the store has them: zero
        enc_hidden = enc_hidden.cpu() * ids.mask[..., None, None]
        dec_hidden = dec_hidden.cpu() * dmask[..., None, None]
        return Seq2SeqBatch(enc_hidden, ids.mask, dec_hidden, dmask, targets, row_example, ids.labels)


def store_weights(store: StoreReader) -> dict[str, torch.Tensor]:
    w = zarr.open_group(store.path, mode="r")["backbone_weights"]
    return {k: torch.from_numpy(w[k][:]) for k in ("lm_head", "encoder_relative_bias", "decoder_relative_bias")}


def build_seq2seq_model(cfg, manifest: dict[str, Any], weights: dict[str, torch.Tensor]) -> T5LadderSideNetwork:
    from ...train import backbone_config

    s = manifest["seq2seq"]
    kept = cfg.layers  # layer dropping: the same kept block indices for encoder and decoder
    return T5LadderSideNetwork(backbone_config(manifest), weights["lm_head"], s["scale_decoder_outputs"],
                               s["encoder_layers"], s["decoder_layers"], kept, kept, cfg.reduction_factor,
                               cfg.dropout, {"encoder": weights["encoder_relative_bias"],
                                             "decoder": weights["decoder_relative_bias"]})


@torch.no_grad()
def predict_split(model: T5LadderSideNetwork, source, split: SplitReader, batch_size: int,
                  device: torch.device) -> np.ndarray:
    """The best-scoring candidate label of every example, in the split's order."""
    model.eval()
    out = np.zeros(len(split), dtype=np.int64)
    for idx in length_bucketed_batches(split.lengths, batch_size * 2, seed=0, epoch=0, shuffle=False):
        b = source(idx).to(device)
        logits = model(b.enc_hidden, b.enc_mask, b.dec_hidden, b.dec_mask, b.row_example)
        scores = sequence_scores(logits, b.targets, b.dec_mask).view(len(idx), -1)  # (B, C)
        out[idx] = scores.argmax(-1).cpu().numpy()
    return out


def _sources(cfg, store: StoreReader, backbone: Seq2SeqBackbone | None) -> dict[str, Any]:
    """One batch source per labelled split: the store, or the live backbone for --online."""
    names = [n for n in store.split_names if store.split(n).labels is not None]
    decs = {n: open_decoder(store, n) for n in names}
    if not cfg.online:
        return {n: CachedSeq2Seq(store.split(n), decs[n], cfg.preload) for n in names}
    return {n: OnlineSeq2Seq(store.split(n), decs[n], backbone, store.manifest) for n in names}


def _check_options(cfg) -> None:
    """Options of the encoder-only trainer that have no meaning for T5 side networks."""
    if cfg.head != "lst":
        raise TrainConfigError(expected("--head lst for a T5 store", cfg.head))
    if cfg.side_heads is not None:
        raise TrainConfigError(expected("the backbone's head count for T5 side blocks (it carries the relative "
                                        "position bias)", f"--side-heads {cfg.side_heads}", "Drop --side-heads."))


def seq2seq_recipe(cfg, store: StoreReader, device: torch.device, eval_name: str | None):
    """What `sidetrain.train.train()` needs for an encoder-decoder store: the T5 side network, cached or
    live batches, the teacher-forced loss and candidate scoring."""
    from ...train import Recipe

    _check_options(cfg)
    manifest = store.manifest
    metric = cfg.metric or "accuracy"
    if metric in M.REGRESSION:
        raise TrainConfigError(expected("a classification --metric for a T5 store", metric))
    if cfg.train_split != manifest["seq2seq"]["train_split"]:
        raise TrainConfigError(expected(f"--train-split {manifest['seq2seq']['train_split']} (the split whose gold "
                                        "targets were decoded)", cfg.train_split))
    model = build_seq2seq_model(cfg, manifest, store_weights(store))
    backbone = None
    if cfg.init == "pruned" or cfg.online:
        backbone = load_seq2seq_backbone(manifest["backbone"]["name"], "fp32", str(device))
        check_match("backbone weights", manifest["backbone"]["revision"], backbone.revision)
    if cfg.init == "pruned":  # side blocks = backbone blocks pruned to 1/r by Fisher information (cached)
        from .prune import fisher_scores, pruned_init

        pruned_init(model, backbone, fisher_scores(store, backbone))
    model = model.to(device)
    sources = _sources(cfg, store, backbone)
    resolved = {**asdict(cfg), "metric": metric, "eval_split": eval_name, "layers": model.enc_kept,
                "decoder_layers": model.dec_kept, "store_manifest": {k: manifest[k] for k in (
                    "backbone", "tokenizer", "layers", "task", "max_length", "store_dtype", "precision",
                    "hidden_size", "seq2seq")}}

    def loss(forward, b: Seq2SeqBatch) -> torch.Tensor:
        logits = forward(b.enc_hidden, b.enc_mask, b.dec_hidden, b.dec_mask, b.row_example)
        return target_loss(logits.float(), b.targets, b.dec_mask)

    def predict(name: str, amp) -> np.ndarray:
        with amp or contextlib.nullcontext():
            return predict_split(model, sources[name], store.split(name), cfg.batch_size, device)

    return Recipe(model, sources, "classification", metric, manifest["task"]["num_labels"], resolved, loss, predict)
