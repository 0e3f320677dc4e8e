"""Text datasets before the backbone loads: read, tokenise, label (shared by every kind with a text part).

Everything here is cheap (tokenizer only): the text kinds of store (encoder, seq2seq, vision_language) plan
with it, so `lst extract --dry-run` never loads weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import ExtractConfig
from ..errors import DatasetError, expected
from .sources import Columns, Quoting, load_dataset_path, resolve_columns


@dataclass
class SplitPlan:
    name: str
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: np.ndarray | None
    truncated: int
    rejected_rows: int
    rejected_lines: list[int] = field(default_factory=list)
    offsets: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = np.zeros(len(self.input_ids) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in self.input_ids], out=self.offsets[1:])

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def n_shards(self, shard_tokens: int) -> int:
        return math.ceil(self.n_tokens / shard_tokens)


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
        plans[name] = SplitPlan(name, ids, types, labels[name], truncated, table.rejected_rows,
                                 table.rejected_lines)
    info = {"source": data.source, "fingerprint": data.fingerprint, "columns": asdict(columns),
            "quoting": {k: v.quoting for k, v in data.splits.items() if v.quoting}}
    return plans, {"dataset": info, "task": {"type": task, "label_names": label_names,
                                              "num_labels": len(label_names) if task == "classification" else 1}}


def text_columns(plan: SplitPlan) -> dict[str, np.ndarray]:
    """What a text split stores beside its states: offsets, token ids, token types, labels."""
    columns = {"offsets": plan.offsets,
               "input_ids": np.fromiter((t for x in plan.input_ids for t in x), dtype=np.int32, count=plan.n_tokens),
               "token_type_ids": np.fromiter((t for x in plan.token_type_ids for t in x), dtype=np.int8,
                                             count=plan.n_tokens)}
    if plan.labels is not None:
        columns["labels"] = plan.labels
    return columns


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and (B, T) mask of token-id lists."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[r, :len(x)] = 1
    return ids, mask
