"""The text part of a store, as every kind with a text encoder stores it (encoder, vision_language; seq2seq
keeps its layout for the encoder states): the plan of tokenised splits, the rows computed in batches by
the frozen encoder, and the storage error measured on a sample.

Per split S (featcache/layout.py for the sharded arrays):
    S/hidden          (n_tokens, n_layers, d)   hidden_states[i] of the requested layers (0 = embedding output)
    S/offsets         (n_examples + 1,) int64   example i owns tokens offsets[i]:offsets[i+1]
    S/input_ids       (n_tokens,) int32         real tokens only, no padding
    S/token_type_ids  (n_tokens,) int8
    S/labels          (n_examples,) int64 (classification) or float32 (regression); absent if unlabelled
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ExtractConfig
from ..fidelity import measure, sample_indices
from ..plan import ROOT, KindPlan, PartPlan, RowsFn
from .backbone import Backbone, load_backbone
from .splits import SplitPlan, pad_batch, plan_splits, text_columns


def text_plan(cfg: ExtractConfig, tokenizer, config, layers: list[int], hidden_size: int,
              n_blocks: int) -> KindPlan:
    """The plan every text kind starts from: tokenised splits, one ROOT part each, the shared manifest."""
    splits, meta = plan_splits(cfg, tokenizer)
    parts = {n: {ROOT: PartPlan(p.offsets, layers, hidden_size, text_columns(p))} for n, p in splits.items()}
    request = {"dataset_fingerprint": meta["dataset"]["fingerprint"], "splits": sorted(splits),
               "max_length": cfg.max_length, "layers": layers, "columns": meta["dataset"]["columns"],
               "task": meta["task"]["type"]}
    manifest = {"backbone": {"model_type": config.model_type, "num_layers": n_blocks,
                             "hidden_size": hidden_size, "config": config.to_dict()},
                "tokenizer": {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id},
                "layers": layers, "hidden_size": hidden_size, "max_length": cfg.max_length, **meta}
    facts = {n: {"truncated": p.truncated, "rejected_rows": p.rejected_rows, "labelled": p.labels is not None,
                 **({"rejected_lines": p.rejected_lines} if p.rejected_lines else {})} for n, p in splits.items()}
    return KindPlan(parts, cfg.store_dtype, request, manifest, facts, state=splits)


def padded_text(plan: SplitPlan, items: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, token types), each (B, T), of examples `items` of a tokenised split."""
    ids, mask = pad_batch([plan.input_ids[i] for i in items], pad_id)
    types, _ = pad_batch([plan.token_type_ids[i] for i in items], 0)
    return ids, mask, types


def text_rows(tokenised: SplitPlan, layers: list[int], backbone: Backbone) -> RowsFn:
    """The rows of a tokenised split: each example's real tokens, (len_i, n_layers, d)."""
    pad_id = backbone.tokenizer.pad_token_id or 0

    def compute(items: list[int]) -> list[torch.Tensor]:
        ids, mask, types = padded_text(tokenised, items, pad_id)
        states = backbone.hidden_states(ids, mask, types, layers).cpu()  # (B, T, L, d)
        return [states[r, :len(tokenised.input_ids[i])] for r, i in enumerate(items)]

    return compute


def text_fidelity(cfg: ExtractConfig, splits: dict[str, SplitPlan], layers: list[int], store_dtype: str,
                  backbone: Backbone) -> dict[str, Any] | None:
    """The `fidelity` entry of a text part, measured on `cfg.error_sample` examples of its first split."""
    name, first = next(iter(splits.items()))
    picks = sample_indices(len(first.input_ids), cfg.error_sample)
    if not picks:
        return None
    result = measure(backbone, [first.input_ids[i] for i in picks], [first.token_type_ids[i] for i in picks],
                     layers, store_dtype, cfg.batch_size,
                     load_fp32=lambda: load_backbone(backbone.name, "fp32", str(backbone.device)))
    result["split"] = name
    return result
