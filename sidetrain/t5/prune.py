"""Pruned initialisation of the T5 side blocks (docs/design.md section 1, the paper's default).

Each side block starts as the backbone block it sits beside, structurally pruned to 1/r of its
channels: d_model channels (one set for the whole residual stream), feed-forward neurons and, per
head, key/value dimensions, ranked by empirical Fisher information over the first ~1024 training
examples (the accumulation, the cache beside the store and the ranking: sidetrain/fisher.py). The
cache file is `<store>.fisher.safetensors` (the train split is fixed by the manifest); it is recomputed
for another count, other backbone weights or an older cache format.

What is specific to this kind: the loss (the teacher-forced cross-entropy of the gold target text),
the T5 parameter names -> channel groups, and the slicing into the side blocks. The scored weights are
what `pruned_init` copies: every encoder and decoder block (but block 0's relative position bias,
which the side network copies whole at construction) and each stack's final layer norm. The shared
embedding and the LM head start no side weight and are not scored.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from featcache.reader import StoreReader
from featcache.store import check_match
from featcache.text.t5 import Seq2SeqBackbone, load_seq2seq_backbone

from ..fisher import (
    BATCH_SIZE,
    N_EXAMPLES,
    cache_meta,
    cache_path,
    cached_scores,
    example_batches,
    fisher_information,
    top_channels,
    top_per_head,
)
from ..networks.t5 import T5LadderSideNetwork
from .data import open_decoder

ATTN = re.compile(r"layer\.(\d)\.(SelfAttention|EncDecAttention)\.([qkvo])\.weight$")
# the backbone weights pruned_init copies, hence the ones scored
SCORED = re.compile(r"^(encoder|decoder)\.(block\.\d+\.(?!.*relative_attention_bias)|final_layer_norm\.)")


def fisher_path(store: StoreReader) -> Path | None:
    """`<store>.fisher.safetensors`; None for a remote store (not cached)."""
    return cache_path(store)


def fisher_scores(store: StoreReader, backbone: Seq2SeqBackbone | None = None, n_examples: int = N_EXAMPLES,
                  batch_size: int = BATCH_SIZE) -> dict[str, torch.Tensor]:
    """Channel importances: 'model' (d,), '<stack>.<b>.ff' (d_ff,), '<stack>.<b>.layer.<k>' (heads*d_kv,).

    Read from the cache file when it was computed for the same split, count and backbone weights; the
    backbone is only loaded (when not given) if they must be computed.
    """
    m = store.manifest
    split_name = m["seq2seq"]["train_split"]
    n = min(n_examples, len(store.split(split_name)))

    def compute() -> dict[str, torch.Tensor]:
        bb = backbone or load_seq2seq_backbone(m["backbone"]["name"], "fp32", "auto")
        check_match("backbone weights", m["backbone"]["revision"], bb.revision)
        return _compute(bb, store, split_name, n, batch_size)

    return cached_scores(fisher_path(store), cache_meta(split_name, n, m["backbone"]["revision"]), compute)


def _compute(backbone: Seq2SeqBackbone, store: StoreReader, split_name: str, n: int,
             batch_size: int) -> dict[str, torch.Tensor]:
    model, dev = backbone.model, backbone.device
    split, dec = store.split(split_name), open_decoder(store, split_name)

    def loss(idx: np.ndarray) -> torch.Tensor:
        enc = split.token_batch(idx)
        targets, mask, _ = dec.token_part(dec.rows(idx))
        return model(input_ids=enc.input_ids.to(dev), attention_mask=enc.mask.long().to(dev),
                     labels=targets.masked_fill(~mask, -100).to(dev)).loss

    params = {name: p for name, p in model.named_parameters() if SCORED.search(name)}
    fisher = fisher_information(model, example_batches(split.lengths, n, batch_size), loss, params)
    return _channel_scores(fisher, int(model.config.d_model))


def _channel_scores(fisher: dict[str, torch.Tensor], d: int) -> dict[str, torch.Tensor]:
    model = torch.zeros(d)
    out: dict[str, torch.Tensor] = {}
    for name, f in fisher.items():
        f = f.float().cpu()
        parts = name.split(".")
        if parts[0] not in ("encoder", "decoder"):
            continue  # shared embedding / LM head: not scored (SCORED), no side weight starts from them
        if name.endswith("layer_norm.weight"):
            model += f
            continue
        if parts[1] != "block":
            continue
        key = f"{parts[0]}.{parts[2]}"
        att = ATTN.search(name)
        if att:
            sub = f"{key}.layer.{att.group(1)}"
            inner = f.sum(1) if att.group(3) != "o" else f.sum(0)  # (heads * d_kv,)
            model += f.sum(0) if att.group(3) != "o" else f.sum(1)
            out[sub] = out.get(sub, 0) + inner
        elif re.search(r"\.wi(_\d)?\.weight$", name):
            out[f"{key}.ff"] = out.get(f"{key}.ff", 0) + f.sum(1)
            model += f.sum(0)
        elif name.endswith("wo.weight"):
            out[f"{key}.ff"] = out.get(f"{key}.ff", 0) + f.sum(0)
            model += f.sum(1)
    out["model"] = model
    return out


def pruned_init(side: T5LadderSideNetwork, backbone: Seq2SeqBackbone, scores: dict[str, torch.Tensor]) -> None:
    """Overwrite the side blocks (and final norms) with slices of the backbone blocks they sit beside."""
    cfg = side.config
    keep_model = top_channels(scores["model"], cfg.d_model)
    with torch.no_grad():
        for stack, blocks, kept in (("encoder", side.enc_blocks, side.enc_kept),
                                    ("decoder", side.dec_blocks, side.dec_kept)):
            source = getattr(backbone.model, stack)
            for j, layer in enumerate(kept):
                b = layer - 1  # hidden_states index i is the output of block i - 1
                key = f"{stack}.{b}"
                ff = top_channels(scores[f"{key}.ff"], cfg.d_ff)
                src = dict(source.block[b].named_parameters())
                for name, p in blocks[j].named_parameters():
                    if name.endswith("relative_attention_bias.weight"):
                        continue  # copied from block 0 of the backbone at construction
                    w = src[name].detach().float().cpu()
                    att = ATTN.search(name)
                    if att:
                        inner = top_per_head(scores[f"{key}.layer.{att.group(1)}"], cfg.num_heads, cfg.d_kv)
                        w = w[inner][:, keep_model] if att.group(3) != "o" else w[keep_model][:, inner]
                    elif re.search(r"\.wi(_\d)?\.weight$", name):
                        w = w[ff][:, keep_model]
                    elif name.endswith("wo.weight"):
                        w = w[keep_model][:, ff]
                    else:  # layer norms
                        w = w[keep_model]
                    p.copy_(w)
            norm = side.enc_norm if stack == "encoder" else side.dec_norm
            norm.weight.copy_(source.final_layer_norm.weight.detach().float().cpu()[keep_model])
