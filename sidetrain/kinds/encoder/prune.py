"""Pruned initialisation of the encoder-only side blocks (docs/design.md section 1, the paper's default).

Side block j starts as the backbone block it sits beside, structurally pruned to 1/r of its channels:
the residual stream (one channel set shared by every block, since the residual adds them up),
feed-forward neurons, and attention inner dims, chosen per head so the side keeps the backbone's head
count. Query and key dims are ranked together (their dot product pairs them), value dims with the
output projection's inputs (the same axis). Ranks come from the empirical Fisher information over the
first ~1024 training examples (the accumulation, cache and ranking: sidetrain/fisher.py).

What is specific to this kind: the loss (an encoder-only backbone has no task head to take a gradient
from, so a linear head is first fitted on the mean-pooled last layer, from the store when it holds that
layer, and its task loss is used), which channel group each axis of a block parameter indexes, and the
slicing into the side blocks. The scored weights are the backbone blocks, every parameter of them: they
are exactly what `pruned_init` copies.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featcache.errors import TrainConfigError, expected
from featcache.reader import SplitReader, StoreReader
from featcache.store import check_match
from featcache.text.backbone import Backbone, load_backbone

from ...fisher import (
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
from ...networks.encoder_stack import LadderSideNetwork
from ...networks.family import block_list
from ...probe import fit_linear

# Attention projections are d x d: shapes cannot tell them apart, names must. BERT / RoBERTa / ELECTRA /
# MiniLM, DistilBERT, MPNet, DeBERTa-v2 (whose position projections pair with query/key dims too).
# 'qk' = query/key inner dims, 'vo' = value out dims = output-projection in dims.
ATTENTION = [("qk", re.compile(r"(attention\.self\.(pos_)?(query|key)(_proj)?|\.[qk]_lin|attn\.[qk])$")),
             ("vo", re.compile(r"(attention\.self\.value(_proj)?|\.v_lin|attn\.v)$")),
             ("out", re.compile(r"(attention\.output\.dense|\.out_lin|attn\.o)$"))]
# (out axis, in axis) of each role's weight; a bias has the out axis only.
AXES = {"qk": ("qk", "model"), "vo": ("vo", "model"), "out": ("model", "vo"),
        "ff_in": ("ff", "model"), "ff_out": ("model", "ff")}


# ---------------------------------------------------------------- which channel each axis indexes

def block_axes(block: nn.Module, d: int, where: str = "") -> dict[str, tuple[str, ...]]:
    """For every parameter of one block, the channel group each axis indexes ('model', 'ff', 'qk', 'vo')."""
    params = dict(block.named_parameters())
    other = [s for p in params.values() if p.dim() == 2 for s in p.shape if s != d]
    d_ff = max(set(other), key=other.count) if other else None  # the one non-residual width
    out: dict[str, tuple[str, ...]] = {}
    for name, p in params.items():
        stem, kind = name.rsplit(".", 1) if "." in name else ("", name)
        weight = params.get(f"{stem}.weight")
        if kind == "bias" and weight is not None and weight.dim() == 2:
            axes = _weight_axes(stem, tuple(weight.shape), d, d_ff)
            axes = axes[:1] if axes and p.shape == weight.shape[:1] else None  # a bias follows its out axis
        elif p.dim() == 2:
            axes = _weight_axes(stem, tuple(p.shape), d, d_ff)
        else:
            axes = ("model",) if tuple(p.shape) == (d,) else None  # layer norms live on the residual stream
        if axes is None:
            raise TrainConfigError(
                f"--init pruned cannot map backbone parameter '{where}{name}' (shape {tuple(p.shape)}, width {d}) "
                "to residual, feed-forward or attention channels: this block layout is not supported. "
                "Use --init random.")
        out[name] = axes
    return out


def _weight_axes(stem: str, shape: tuple[int, ...], d: int, d_ff: int | None) -> tuple[str, ...] | None:
    for role, pattern in ATTENTION:
        if pattern.search(stem):
            return AXES[role] if shape == (d, d) else None
    if d_ff is not None and shape == (d_ff, d):  # one axis of width d_ff: a feed-forward weight
        return AXES["ff_in"]
    if d_ff is not None and shape == (d, d_ff):
        return AXES["ff_out"]
    return None


# ---------------------------------------------------------------- Fisher scores (cached)

def fisher_path(store: StoreReader, split: str, n: int) -> Path | None:
    """`<store>.fisher-encoder-<split>-<n>.safetensors`; None for a remote store (not cached)."""
    return cache_path(store, "encoder", split, n)


def fisher_scores(store: StoreReader, split_name: str = "train", backbone: Backbone | None = None,
                  n_examples: int = N_EXAMPLES, batch_size: int = BATCH_SIZE,
                  device: str = "auto") -> dict[str, torch.Tensor]:
    """Channel importances: 'model' (d,), '<b>.ff' (d_ff,), '<b>.qk' and '<b>.vo' (heads * head_dim,) per block b.

    Read from the cache file when it was computed for the same split, count and backbone weights; the
    backbone is only loaded (when not given) if they must be computed.
    """
    split = store.split(split_name)
    if split.labels is None:
        raise TrainConfigError(expected(f"labels in split '{split_name}' for --init pruned (Fisher scores need a loss)",
                                        "a split without labels"))
    n = min(n_examples, len(split))
    m = store.manifest

    def compute() -> dict[str, torch.Tensor]:
        bb = backbone or load_backbone(m["backbone"]["name"], "fp32", device)
        check_match("backbone weights", m["backbone"]["revision"], bb.revision)
        return _compute(bb, split, n, m["task"]["type"], int(m["task"]["num_labels"]), batch_size)

    return cached_scores(fisher_path(store, split_name, n), cache_meta(split_name, n, m["backbone"]["revision"]),
                         compute)


def _compute(backbone: Backbone, split: SplitReader, n: int, task: str, num_labels: int,
             batch_size: int) -> dict[str, torch.Tensor]:
    d = backbone.hidden_size
    blocks = block_list(backbone.model, backbone.num_layers)
    axes = [block_axes(b, d, f"block {i}: ") for i, b in enumerate(blocks)]  # fail before the slow part
    batches = example_batches(split.lengths, n, batch_size)
    head = _fit_head(backbone, split, batches, task, num_labels).to(backbone.device)

    def loss(idx: np.ndarray) -> torch.Tensor:
        b = split.token_batch(idx)
        logits = head(_pooled_last(backbone, b))
        y = b.labels.to(backbone.device)
        return F.mse_loss(logits.squeeze(-1), y.float()) if task == "regression" else F.cross_entropy(logits, y.long())

    params = {f"{i}.{k}": p for i, b in enumerate(blocks) for k, p in b.named_parameters()}
    fisher = fisher_information(backbone.model, batches, loss, params)
    per_block = [{k: fisher[f"{i}.{k}"] for k, _ in b.named_parameters()} for i, b in enumerate(blocks)]
    return _channel_scores(per_block, axes, d)


def _pooled_last(backbone: Backbone, b) -> torch.Tensor:
    """Mean over real tokens of the last block's output, with gradients (Backbone.hidden_states has none)."""
    kwargs = {"input_ids": b.input_ids.to(backbone.device), "attention_mask": b.mask.long().to(backbone.device)}
    if getattr(backbone.config, "type_vocab_size", 0):
        kwargs["token_type_ids"] = b.token_type_ids.to(backbone.device)
    h = backbone.model(**kwargs, return_dict=True).last_hidden_state.float()
    m = b.mask.to(backbone.device).unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


def _fit_head(backbone: Backbone, split: SplitReader, batches: list[np.ndarray], task: str,
              num_labels: int) -> nn.Linear:
    """The probe's linear head on the same examples, so the loss has a task-shaped gradient."""
    last = backbone.num_layers
    feats, labels = [], []
    with torch.no_grad():
        for idx in batches:
            if last in split.layers:  # the store already holds it: no backbone pass
                b = split.batch(idx, [last])
                m = b.mask.unsqueeze(-1).float()
                feats.append((b.hidden[:, :, 0] * m).sum(1) / m.sum(1).clamp(min=1))
            else:
                b = split.token_batch(idx)
                feats.append(_pooled_last(backbone, b).cpu())
            labels.append(b.labels)
    x, y = torch.cat(feats), torch.cat(labels)
    mean, std = x.mean(0), x.std(0).nan_to_num(1.0).clamp(min=1e-6)  # standardised: L-BFGS converges fast
    head = fit_linear((x - mean) / std, y.float() if task == "regression" else y.long(), num_labels, 1e-3, task)
    with torch.no_grad():  # fold the standardisation into the head, which then takes raw features
        head.weight /= std
        head.bias -= head.weight @ mean
    return head.requires_grad_(False)


def _channel_scores(fisher: list[dict[str, torch.Tensor]], axes: list[dict[str, tuple[str, ...]]],
                    d: int) -> dict[str, torch.Tensor]:
    """A channel's score: the summed Fisher of every weight that reads or writes it."""
    out = {"model": torch.zeros(d)}
    for b, (fs, ax) in enumerate(zip(fisher, axes)):
        for name, f in fs.items():
            f = f.float().cpu()
            for axis, group in enumerate(ax[name]):
                s = f if f.dim() == 1 else f.sum(1 - axis)
                key = "model" if group == "model" else f"{b}.{group}"
                out[key] = out[key] + s if key in out else s.clone()
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------- slicing

def pruned_init(side: LadderSideNetwork, backbone: Backbone, scores: dict[str, torch.Tensor]) -> None:
    """Overwrite every side block with the slices of the backbone block it sits beside."""
    d, heads = backbone.hidden_size, int(backbone.config.num_attention_heads)
    source = block_list(backbone.model, backbone.num_layers)
    keep_model = top_channels(scores["model"], side.config.hidden_size)
    with torch.no_grad():
        for j, layer in enumerate(side.kept_layers):
            b = layer - 1  # hidden_states index i is the output of block i - 1
            src = dict(source[b].named_parameters())
            axes = block_axes(source[b], d, f"block {b}: ")
            keep: dict[str, torch.Tensor] = {"model": keep_model}
            for name, p in side.blocks[j].named_parameters():
                if name not in src:
                    raise TrainConfigError(f"--init pruned: side parameter '{name}' has no backbone counterpart in "
                                           f"block {b}. Use --init random.")
                w = src[name].detach().float().cpu()
                for axis, group in enumerate(axes[name]):
                    if group not in keep:  # sized by the side block itself: no per-family width names
                        keep[group] = _keep(scores[f"{b}.{group}"], group, p.shape[axis], heads)
                    w = w.index_select(axis, keep[group])
                if w.shape != p.shape:
                    raise TrainConfigError(expected(f"side parameter '{name}' shaped like the pruned backbone one",
                                                    f"{tuple(p.shape)} vs {tuple(w.shape)}", "Use --init random."))
                p.copy_(w)


def _keep(scores: torch.Tensor, group: str, k: int, heads: int) -> torch.Tensor:
    if group == "ff":
        return top_channels(scores, k)
    if k % heads:  # attention dims are picked inside each backbone head
        raise TrainConfigError(expected(f"side attention width {k} divisible by the backbone's {heads} heads for "
                                        "--init pruned", k, "Drop --side-heads or use --init random."))
    return top_per_head(scores, heads, k // heads)


def init_from_backbone(side: LadderSideNetwork, store: StoreReader, train_split: str, device: str = "auto") -> None:
    """What `lst train --init pruned` does: load the backbone once, score (or read the cache), slice, release."""
    m = store.manifest
    # the head fit reseeds torch: keep the run's dropout stream the same whether or not scores were cached
    with torch.random.fork_rng(devices=[]):
        backbone = load_backbone(m["backbone"]["name"], "fp32", device)
        check_match("backbone weights", m["backbone"]["revision"], backbone.revision)
        pruned_init(side, backbone, fisher_scores(store, train_split, backbone))
