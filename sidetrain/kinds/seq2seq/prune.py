"""Pruned initialisation of the T5 side blocks (DESIGN section 1, the paper's default).

Each side block starts as the backbone block it sits beside, structurally pruned to 1/r of its
channels: d_model channels (one set for the whole residual stream), feed-forward neurons and, per
head, key/value dimensions, ranked by empirical Fisher information (sum of squared gradients of the
teacher-forced loss, per batch) over the first ~1024 training examples. The Fisher scores need
backbone gradients once; they are cached beside the store (`<store>.fisher.safetensors`, keyed like the
encoder's by split, count and backbone weights) and do not depend on r or the kept layers, so every
trial slices from the same file.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from featcache.reader import StoreReader
from featcache.seq2seq import Seq2SeqBackbone, load_seq2seq_backbone

from ..encoder.prune import read_cached_scores, top_channels, top_per_head, write_cached_scores
from .model import T5LadderSideNetwork

log = logging.getLogger(__name__)
ATTN = re.compile(r"layer\.(\d)\.(SelfAttention|EncDecAttention)\.([qkvo])\.weight$")


def fisher_path(store: StoreReader) -> Path | None:
    return None if "://" in store.path else Path(store.path.rstrip("/") + ".fisher.safetensors")


def fisher_scores(store: StoreReader, backbone: Seq2SeqBackbone | None = None, n_examples: int = 1024,
                  batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Channel importances: 'model' (d,), '<stack>.<b>.ff' (d_ff,), '<stack>.<b>.layer.<k>' (heads*d_kv,)."""
    m = store.manifest
    split_name = m["seq2seq"]["train_split"]
    split = store.split(split_name)
    n = min(n_examples, len(split))
    path = fisher_path(store)
    meta = {"split": split_name, "n_examples": str(n), "backbone_revision": str(m["backbone"]["revision"])}
    cached = read_cached_scores(path, meta)
    if cached is not None:
        return cached
    from .recipe import open_decoder

    backbone = backbone or load_seq2seq_backbone(m["backbone"]["name"], "fp32", "auto")
    model = backbone.model
    model.requires_grad_(True)
    dec = open_decoder(store, split_name)
    fisher = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    try:
        for b in range(0, n, batch_size):
            idx = np.arange(b, min(b + batch_size, n))
            enc = split.token_batch(idx)
            targets, mask, _ = dec.token_part(dec.rows(idx))
            labels = targets.masked_fill(~mask, -100)
            model.zero_grad(set_to_none=True)
            dev = backbone.device
            loss = model(input_ids=enc.input_ids.to(dev), attention_mask=enc.mask.long().to(dev),
                         labels=labels.to(dev)).loss
            loss.backward()
            for name, p in model.named_parameters():
                if p.grad is not None:
                    fisher[name] += p.grad.detach() ** 2
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
    scores = _channel_scores(fisher, int(m["hidden_size"]))
    write_cached_scores(path, scores, meta)
    return scores


def _channel_scores(fisher: dict[str, torch.Tensor], d: int) -> dict[str, torch.Tensor]:
    model = torch.zeros(d)
    out: dict[str, torch.Tensor] = {}
    for name, f in fisher.items():
        f = f.float().cpu()
        parts = name.split(".")
        if parts[0] not in ("encoder", "decoder"):
            continue  # shared embedding / LM head: not part of a side block
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
