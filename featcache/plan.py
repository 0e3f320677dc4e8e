"""Before the backbone loads: read and tokenise the dataset, size the store, and summarise it.

Everything here is cheap (tokenizer and config only), so `lst extract --dry-run` is this module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import store as S
from .backbone import Backbone, load_tokenizer_and_config
from .errors import DatasetError, StoreError, expected
from .sources import Columns, Quoting, load_dataset_path, resolve_columns

if TYPE_CHECKING:
    from .config import ExtractConfig


@dataclass
class SplitPlan:
    name: str
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: np.ndarray | None
    truncated: int
    rejected_rows: int
    offsets: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = np.zeros(len(self.input_ids) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in self.input_ids], out=self.offsets[1:])

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def n_shards(self, shard_tokens: int) -> int:
        return math.ceil(self.n_tokens / shard_tokens)


@dataclass
class Plan:
    """Everything known before the backbone loads: tokenised splits, layout, and the summary."""

    plans: dict[str, SplitPlan]
    meta: dict[str, Any]
    layers: list[int]
    n_blocks: int
    hidden_size: int
    bytes_per_token: int
    shard_tokens: int
    summary: dict[str, Any]
    tokenizer: Any
    model_config: Any


def _labels(data, columns: Columns, task: str) -> tuple[str, list[str], dict[str, np.ndarray | None]]:
    """Map label columns to arrays; returns (task, label_names, per-split labels)."""
    raw: dict[str, Any] = {}
    unlabelled = [n for n, t in data.splits.items() if columns.label is None or columns.label not in t.frame.columns]
    if columns.label is not None and unlabelled:
        labelled = [n for n in data.splits if n not in unlabelled]
        raise DatasetError(expected(f"label column '{columns.label}' in every split (it is in {', '.join(labelled)})",
                                    f"split(s) {', '.join(unlabelled)} without it",
                                    "Add the labels, or extract the unlabelled split(s) into their own store "
                                    f"with --split {unlabelled[0]}."))
    for name, table in data.splits.items():
        if columns.label is None:
            raw[name] = None
            continue
        col = table.frame[columns.label]
        empty = col.isna() | (col.astype(str).str.strip() == "")
        if empty.any():
            raise DatasetError(expected(f"a label on every row of split '{name}'",
                                        f"{int(empty.sum())} rows with an empty '{columns.label}'",
                                        "Fix the file or drop those rows."))
        raw[name] = col.astype(str).str.strip().tolist()
    values = [v for vs in raw.values() if vs for v in vs]
    if task == "auto":
        task = "regression" if values and _all_float(values) and any("." in v for v in values) else "classification"
    if task == "regression":
        if not _all_float(values):
            raise DatasetError(expected("numeric labels for --task regression", "non-numeric values"))
        return task, [], {k: None if v is None else np.asarray(v, dtype=np.float32) for k, v in raw.items()}
    names = sorted(set(values), key=_natural)
    index = {n: i for i, n in enumerate(names)}
    return task, names, {k: None if v is None else np.asarray([index[x] for x in v], np.int64) for k, v in raw.items()}


def _all_float(values: list[str]) -> bool:
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return True


def _natural(v: str) -> tuple:
    # numeric labels sort as numbers ("2" < "10"), others alphabetically
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, 0.0, v)


def plan_splits(cfg: ExtractConfig, tokenizer) -> tuple[dict[str, SplitPlan], dict[str, Any]]:
    """Read and tokenise the dataset (cheap, before the backbone loads)."""
    data = load_dataset_path(cfg.dataset, Quoting(cfg.quoting), cfg.header)
    if cfg.splits:
        missing = [s for s in cfg.splits if s not in data.splits]
        if missing:
            raise DatasetError(expected(f"split(s) {missing} in the dataset", f"splits {sorted(data.splits)}"))
        data.splits = {s: data.splits[s] for s in cfg.splits}
    columns = resolve_columns(data, cfg.text_column, cfg.text_pair_column, cfg.label_column)
    task, label_names, labels = _labels(data, columns, cfg.task)
    plans: dict[str, SplitPlan] = {}
    for name, table in data.splits.items():
        frame = table.frame
        if len(frame) == 0:
            raise DatasetError(expected(f"at least one row in split '{name}'", "an empty split", f"Check {table.source}."))
        texts = frame[columns.text].astype(str).tolist()
        pairs = frame[columns.pair].astype(str).tolist() if columns.pair else None
        full = tokenizer(texts, pairs, truncation=False, verbose=False)["input_ids"]
        enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length)
        ids = enc["input_ids"]
        types = enc.get("token_type_ids") or [[0] * len(x) for x in ids]
        truncated = sum(len(a) > len(b) for a, b in zip(full, ids))
        plans[name] = SplitPlan(name, ids, types, labels[name], truncated, table.rejected_rows)
    info = {"source": data.source, "fingerprint": data.fingerprint, "columns": asdict(columns),
            "quoting": {k: v.quoting for k, v in data.splits.items() if v.quoting}}
    return plans, {"dataset": info, "task": {"type": task, "label_names": label_names,
                                              "num_labels": len(label_names) if task == "classification" else 1}}


def _shard_tokens(cfg: ExtractConfig, bytes_per_token: int) -> int:
    if cfg.shard_tokens:
        return max(cfg.chunk_tokens, cfg.shard_tokens // cfg.chunk_tokens * cfg.chunk_tokens)
    target = (64 << 20) // bytes_per_token
    return max(cfg.chunk_tokens, target // cfg.chunk_tokens * cfg.chunk_tokens)


def _tokenizer_and_config(cfg: ExtractConfig, backbone: Backbone | None):
    if backbone is not None:
        return backbone.tokenizer, backbone.config
    return load_tokenizer_and_config(cfg.model)


def plan_extraction(cfg: ExtractConfig, backbone: Backbone | None = None, loaded: tuple | None = None) -> Plan:
    """Tokenise the dataset and size the store, without loading the backbone's weights."""
    tokenizer, model_config = loaded or _tokenizer_and_config(cfg, backbone)
    n_blocks = int(model_config.num_hidden_layers)
    layers = list(range(n_blocks + 1)) if cfg.layers is None else sorted(set(cfg.layers))
    if not layers or layers[0] < 0 or layers[-1] > n_blocks:
        raise StoreError(expected(f"--layers within 0..{n_blocks} (0 = embedding output)", cfg.layers))
    plans, meta = plan_splits(cfg, tokenizer)
    d = int(model_config.hidden_size)
    bytes_per_token = S.bytes_per_token(cfg.store_dtype, len(layers), d)
    shard_tokens = _shard_tokens(cfg, bytes_per_token)
    summary = preflight(plans, layers, bytes_per_token, shard_tokens)
    return Plan(plans, meta, layers, n_blocks, d, bytes_per_token, shard_tokens, summary, tokenizer, model_config)


def preflight(plans: dict[str, SplitPlan], layers: list[int], bytes_per_token: int, shard_tokens: int) -> dict[str, Any]:
    """What the extraction will write, known before the backbone loads."""
    splits = {n: {"examples": len(p.input_ids), "tokens": p.n_tokens, "truncated": p.truncated,
                  "rejected_rows": p.rejected_rows, "shards": p.n_shards(shard_tokens)} for n, p in plans.items()}
    tokens = sum(p.n_tokens for p in plans.values())
    shards = sum(s["shards"] for s in splits.values())
    size = tokens * bytes_per_token
    rows = [f"{n}: {s['examples']:,} examples, {s['tokens']:,} tokens, {s['truncated']:,} truncated"
            + (f", {s['rejected_rows']:,} rejected rows" if s["rejected_rows"] else "") for n, s in splits.items()]
    text = (f"{'; '.join(rows)}. {len(layers)} layers, {bytes_per_token:,} bytes/token, "
            f"store ~{size / 2**20:,.1f} MiB in {shards} shards of {shard_tokens:,} tokens")
    return {"splits": splits, "examples": sum(s["examples"] for s in splits.values()), "tokens": tokens,
            "truncated": sum(s["truncated"] for s in splits.values()), "layers": layers,
            "bytes_per_token": bytes_per_token, "bytes": size, "shards": shards, "shard_tokens": shard_tokens,
            "text": text}
