"""The on-disk layout of every kind of store: how each part of a split is sized, sharded and created.

Per split S and part P (P = "" is S's own group, e.g. "dec" is S/dec):
    S/P/hidden      (n_tokens, n_layers, d)  storage dtype; sharded along tokens, one writer per shard
    S/P/scales      (n_tokens, n_layers) float32   int8 stores only, sharded like hidden
    S/P/shard_crc   (n_shards,) uint32             zlib crc32 of shard k's hidden (+ scales) bytes
    S/P/shard_done  (n_shards,) uint8              1 once shard k of hidden is written whole
    S/P/<column>    whatever the kind stores beside the states (offsets, input_ids, labels, ...)
Shard sizes are set per part name (the same in every split), since parts differ in bytes per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import zarr

from . import store as S
from .config import ExtractConfig
from .plan import ROOT, KindPlan, PartPlan
from .reader import CHECKSUMS


@dataclass
class Layout:
    """Bytes per token and tokens per shard of each part name, and the pre-flight summary."""

    bytes_per_token: dict[str, int]
    shard_tokens: dict[str, int]
    summary: dict[str, Any]

    def n_shards(self, part_name: str, part: PartPlan) -> int:
        return math.ceil(part.n_tokens / self.shard_tokens[part_name])


def plan_layout(cfg: ExtractConfig, plan: KindPlan) -> Layout:
    first = next(iter(plan.parts.values()))
    bpt = {name: S.bytes_per_token(plan.store_dtype, len(p.layers), p.width) for name, p in first.items()}
    shard = {name: shard_tokens_for(cfg, b) for name, b in bpt.items()}
    layout = Layout(bpt, shard, {})
    layout.summary = preflight(plan, layout)
    return layout


def preflight(plan: KindPlan, layout: Layout) -> dict[str, Any]:
    """What the extraction will write, known before the backbone loads."""
    splits: dict[str, dict[str, Any]] = {}
    size = shards = full = 0
    for name, parts in plan.parts.items():
        root = parts[ROOT]
        facts = plan.split_facts[name]
        splits[name] = {"examples": root.n_rows, "tokens": root.n_tokens, "truncated": facts.get("truncated", 0),
                        "rejected_rows": facts.get("rejected_rows", 0), "shards": layout.n_shards(ROOT, root),
                        "parts": {p: {"rows": part.n_rows, "tokens": part.n_tokens,
                                      "shards": layout.n_shards(p, part)} for p, part in parts.items()}}
        for p, part in parts.items():
            size += part.n_tokens * layout.bytes_per_token[p]
            full += part.n_tokens * S.bytes_per_token(plan.store_dtype, len(part.layers), part.hidden_size)
            shards += layout.n_shards(p, part)
    rows = [f"{n}: {s['examples']:,} examples, {s['tokens']:,} tokens, {s['truncated']:,} truncated"
            + (f", {s['rejected_rows']:,} rejected rows" if s["rejected_rows"] else "")
            + "".join(f"; {p}: {q['rows']:,} rows, {q['tokens']:,} tokens" for p, q in s["parts"].items() if p)
            for n, s in splits.items()]
    layers = next(iter(plan.parts.values()))[ROOT].layers
    text = (f"{'; '.join(rows)}. {len(layers)} layers, {layout.bytes_per_token[ROOT]:,} bytes/token, "
            f"store ~{size / 2**20:,.1f} MiB in {shards} shards of {layout.shard_tokens[ROOT]:,} tokens")
    components = next(iter(plan.parts.values()))[ROOT].components
    if components:
        text += f" ({components} PCA components per layer: {full / max(size, 1):.1f}x smaller than {full / 2**20:,.1f} MiB)"
    return {"splits": splits, "examples": sum(s["examples"] for s in splits.values()),
            "tokens": sum(s["tokens"] for s in splits.values()),
            "truncated": sum(s["truncated"] for s in splits.values()), "layers": layers,
            "bytes_per_token": layout.bytes_per_token[ROOT], "bytes": size, "shards": shards,
            "components": components, "uncompressed_bytes": full,
            "shard_tokens": layout.shard_tokens[ROOT], "text": text}


def create_part(group: zarr.Group, part: PartPlan, store_dtype: str, chunk_tokens: int, shard_tokens: int) -> None:
    """The arrays of one part, states empty (fill 0) and every shard marked not done."""
    n_layers, d = len(part.layers), part.width  # d, or K coefficients in a compressed store
    chunk = chunk_tokens  # may exceed a tiny part: zarr needs shards to be whole chunks, not arrays
    group.create_array("hidden", shape=(part.n_tokens, n_layers, d), dtype=S.ZARR_DTYPES[store_dtype],
                       chunks=(chunk, n_layers, d), shards=(shard_tokens, n_layers, d),
                       compressors=None, fill_value=0, overwrite=True)
    if store_dtype == "int8":
        group.create_array("scales", shape=(part.n_tokens, n_layers), dtype=S.SCALE_DTYPE, chunks=(chunk, n_layers),
                           shards=(shard_tokens, n_layers), compressors=None, fill_value=0, overwrite=True)
    for name, values in part.columns.items():
        group.create_array(name, data=values, overwrite=True)
    # one uncompressed value per shard, each its own chunk: writers of different shards never share a file
    group.create_array(CHECKSUMS, shape=(max(math.ceil(part.n_tokens / shard_tokens), 1),), dtype="uint32",
                       chunks=(1,), compressors=None, fill_value=0, overwrite=True)
    group.create_array("shard_done", shape=(max(math.ceil(part.n_tokens / shard_tokens), 1),), dtype="uint8",
                       chunks=(1,), compressors=None, fill_value=0, overwrite=True)


def shard_tokens_for(cfg: ExtractConfig, bytes_per_token: int) -> int:
    """Tokens per shard: --shard-tokens, else about 64 MiB; a whole number of inner chunks either way."""
    if cfg.shard_tokens:
        return max(cfg.chunk_tokens, cfg.shard_tokens // cfg.chunk_tokens * cfg.chunk_tokens)
    target = (64 << 20) // bytes_per_token
    return max(cfg.chunk_tokens, target // cfg.chunk_tokens * cfg.chunk_tokens)
