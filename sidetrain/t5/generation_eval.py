"""Evaluating free-text targets (`--task generate` stores: captions, open answers) by generating them.

Training needs no backbone: each row's target is teacher-forced from the cache. Evaluation cannot: the backbone
decoder must see the generated tokens. So the side encoder reads the cached encoder states (and image tokens),
the live T5 recomputes only its encoder output (text alone, one pass) for its decoder to cross-attend to, and
decoding runs as `lst predict --generate` does (decoding.py). Rows that share an input (the same text and, in a
vision-language store, the same images: COCO stores one row per reference caption) are generated once and scored
against every target of their group (exact match, BLEU, CIDEr: sidetrain/text_metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from featcache.reader import SplitReader
from featcache.text.t5 import Seq2SeqBackbone

from ..data import length_bucketed_batches
from .data import DecoderSplit
from .decoding import Encoded, beam_search, same_text

MAX_NEW_TOKENS = 40  # the paper's caption length


@dataclass
class ReferenceGroups:
    """Rows grouped by input: `first[r]` the first row of row r's group, `references[r]` every target of it."""

    first: np.ndarray  # (n_rows,) int64
    references: list[list[str]]

    @property
    def unique(self) -> np.ndarray:
        return np.unique(self.first)


def reference_groups(split: SplitReader, dec: DecoderSplit, tokenizer, extra_key: np.ndarray | None = None,
                     eos_id: int | None = None) -> ReferenceGroups:
    """Group a split's rows by their input ids (and `extra_key` per row, e.g. the row's images)."""
    ids = split.column("input_ids")
    offsets = split.offsets
    keys: dict[tuple, int] = {}
    first = np.empty(len(split), dtype=np.int64)
    for r in range(len(split)):
        key = (tuple(ids[offsets[r]:offsets[r + 1]].tolist()),
               () if extra_key is None else tuple(np.atleast_1d(extra_key[r]).tolist()))
        first[r] = keys.setdefault(key, r)
    texts = []
    for r in range(len(split)):
        target = dec.target_ids[dec.offsets[r]:dec.offsets[r + 1]].tolist()
        if eos_id is not None and target and target[-1] == eos_id:
            target = target[:-1]
        texts.append(tokenizer.decode(target, skip_special_tokens=True))
    members: dict[int, list[str]] = {}
    for r, f in enumerate(first):
        members.setdefault(int(f), []).append(texts[r])
    return ReferenceGroups(first, [members[int(f)] for f in first])


@torch.no_grad()
def generate_split(model, backbone: Seq2SeqBackbone, s: dict, split: SplitReader, source, groups: ReferenceGroups,
                   batch_size: int, device: torch.device, num_beams: int = 1,
                   max_new_tokens: int = MAX_NEW_TOKENS) -> np.ndarray:
    """One generated text per row (object array, the split's order), each group generated once. `source`: the
    split's cached batch source (side encoder inputs); `model.side_encoding` runs the side encoder on them."""
    model.eval()
    unique = groups.unique
    made: dict[int, str] = {}
    for pos in length_bucketed_batches(split.lengths[unique], batch_size, seed=0, epoch=0, shuffle=False):
        idx = unique[pos]
        b = source(idx).to(device)
        side_enc, side_mask = model.side_encoding(b)
        ids = split.token_batch(idx)
        _, enc_out = backbone.encode(ids.input_ids, ids.mask.long(), s["encoder_layers"][:1])
        mask = ids.mask.bool().to(backbone.device)
        enc = Encoded(side_enc, side_mask, enc_out, mask, same_text(ids.input_ids, ids.mask))
        out = beam_search(model, backbone, s, enc, max_new_tokens, num_beams)
        made.update({int(r): backbone.tokenizer.decode(o, skip_special_tokens=True) for r, o in zip(idx, out)})
    return np.array([made[int(f)] for f in groups.first], dtype=object)
