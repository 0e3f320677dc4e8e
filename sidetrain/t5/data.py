"""Batches for the T5 side network: encoder states of the split's examples and teacher-forced decoder
states of its `dec` part (one row per (example, candidate)), from the store or the live backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from featcache.reader import SplitReader, StoreReader
from featcache.text.t5 import Seq2SeqBackbone, shift_right

from ..data import BatchSource, as_stored, host_policy, mappable

DECODER_PART = "dec"  # the split's part that holds the decoder rows


@dataclass
class Seq2SeqBatch:
    enc_hidden: torch.Tensor | None  # (B, T, n_enc_layers, d) float32
    enc_mask: torch.Tensor  # (B, T) bool
    dec_hidden: torch.Tensor | None  # (N, U, n_dec_layers, d) float32; N = B * candidates per example
    dec_mask: torch.Tensor  # (N, U) bool
    targets: torch.Tensor  # (N, U) long, pad 0
    row_example: torch.Tensor  # (N,) long: the batch row each decoder row reads
    labels: torch.Tensor | None  # (B,)
    image: torch.Tensor | None = None  # (B, V, n_image_layers, d_img): a vision-language store's image tokens

    def to(self, device: torch.device) -> Seq2SeqBatch:
        move = (lambda t: None if t is None else t.to(device))
        return Seq2SeqBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))

    def side_inputs(self) -> tuple[torch.Tensor, ...]:
        """What the side network's forward takes: the text network's five inputs, then the image tokens if any."""
        text = (self.enc_hidden, self.enc_mask, self.dec_hidden, self.dec_mask, self.row_example)
        return text if self.image is None else (*text, self.image)


class DecoderSplit:
    """S/dec of a seq2seq store: rows (example, candidate) of teacher-forced decoder states, read through
    the store reader (memory-mapped where local, as the split's own examples)."""

    def __init__(self, split: SplitReader) -> None:
        self.part = split.part(DECODER_PART)
        self.offsets = self.part.offsets
        self.target_ids = self.part.column("target_ids").astype(np.int64)
        self.per_example = len(self.part) // max(len(split), 1)  # candidates per example, adjacent rows

    def load(self) -> DecoderSplit:
        self.part.load()
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

    def hidden(self, rows: np.ndarray, mask: torch.Tensor) -> torch.Tensor:
        """Decoder states of `rows` (N, U, n_layers, d), zero on padding."""
        flat = self.part.hidden_rows(self.offsets[rows], self.offsets[rows + 1])
        out = torch.zeros((*mask.shape, *flat.shape[1:]), dtype=torch.float32)
        out[mask] = flat
        return out


def open_decoder(store: StoreReader, name: str) -> DecoderSplit:
    return DecoderSplit(store.split(name))


class CachedSeq2Seq(BatchSource):
    """Encoder and decoder states from the store, kept as `sidetrain.data.host_policy` says for the split and
    its decoder rows together (ram: copied into RAM; mmap: read memory-mapped; stream: read per batch)."""

    def __init__(self, split: SplitReader, dec: DecoderSplit, preload: bool | None = None,
                 memory_budget: float | None = None) -> None:
        nbytes = split.nbytes() + dec.part.nbytes()  # decoder rows are a few tokens each: they follow the encoder
        self.policy = host_policy(split, preload, memory_budget, nbytes)
        keep = self.policy == "ram"
        self.split = split.load() if keep else split
        self.dec = dec.load() if keep else dec
        self.held_bytes = nbytes if keep else 0
        self.mapped_bytes = nbytes if not keep and mappable(split) else 0

    def __call__(self, idx: np.ndarray) -> Seq2SeqBatch:
        enc = self.split.batch(idx)
        rows = self.dec.rows(idx)
        targets, dmask, _ = self.dec.token_part(rows)
        row_example = torch.arange(len(idx)).repeat_interleave(self.dec.per_example)
        return Seq2SeqBatch(enc.hidden, enc.mask, self.dec.hidden(rows, dmask), dmask, targets, row_example,
                            enc.labels)


class OnlineSeq2Seq(BatchSource):
    """Classic LST: the live backbone recomputes encoder and teacher-forced decoder states per batch."""

    policy = "online"

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
        # a compressed store: the live states projected onto its bases, as the store holds them
        enc_hidden = as_stored(self.split, enc_hidden.cpu(), self.enc_layers) * ids.mask[..., None, None]
        dec_hidden = as_stored(self.dec.part, dec_hidden.cpu(), self.dec_layers) * dmask[..., None, None]
        return Seq2SeqBatch(enc_hidden, ids.mask, dec_hidden, dmask, targets, row_example, ids.labels)
