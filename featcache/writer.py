"""Stage 1: run the frozen backbone once over a dataset and write its per-layer activations.

Work is cut into shards of `shard_tokens` tokens along each split's token axis. A shard is computed
into a buffer and written whole, once, by one writer, then marked done in `S/shard_done`; a crash
leaves some shards unmarked, and re-running the same extraction recomputes only those. Examples
that straddle a shard boundary are computed by both neighbours (a few examples per shard).
"""

from __future__ import annotations

import logging
import math
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from . import store as S
from .backbone import Backbone, load_backbone
from .errors import DatasetError, StoreError, expected
from .progress import progress_bar
from .sources import Columns, Quoting, load_dataset_path, resolve_columns

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    """Options of `lst extract`; the resolved copy is saved in the manifest."""

    model: str
    dataset: str
    out: str
    splits: list[str] | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    task: str = "auto"  # auto | classification | regression
    max_length: int = 128
    layers: list[int] | None = None  # hidden_states indices; 0 = embedding output; None = all
    store_dtype: str = "fp16"
    precision: str = "fp32"
    batch_size: int = 64
    device: str = "auto"
    overwrite: bool = False
    quoting: str = "auto"
    header: bool = True
    shard_tokens: int = 0  # 0: about 64 MiB per shard
    chunk_tokens: int = 64  # inner chunk: the unit of a random read
    label_text: str | None = None  # encoder-decoder: JSON file mapping label -> target text

    def __post_init__(self) -> None:
        if self.store_dtype not in S.STORE_DTYPES:
            raise StoreError(expected(f"--store-dtype one of {S.STORE_DTYPES}", self.store_dtype))
        if self.max_length < 2:
            raise DatasetError(expected("--max-length of at least 2", self.max_length))
        if self.batch_size < 1:
            raise DatasetError(expected("--batch-size of at least 1", self.batch_size))
        if self.task not in ("auto", "classification", "regression"):
            raise DatasetError(expected("--task auto, classification or regression", self.task))


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


def _labels(data, columns: Columns, task: str) -> tuple[str, list[str], dict[str, np.ndarray | None]]:
    """Map label columns to arrays; returns (task, label_names, per-split labels)."""
    raw: dict[str, Any] = {}
    for name, table in data.splits.items():
        if columns.label is None or columns.label not in table.frame.columns:
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


def open_for_write(cfg: ExtractConfig, request: dict[str, Any]) -> tuple[zarr.Group, bool]:
    """Create the store, or reopen it to resume. Returns (group, resuming)."""
    path = Path(cfg.out)
    is_url = "://" in cfg.out
    if not is_url and path.exists():
        try:
            manifest = zarr.open_group(cfg.out, mode="r").attrs.get(S.MANIFEST_KEY)
        except Exception:  # noqa: BLE001 - anything unreadable is "not a store"
            manifest = None
        if manifest is None and (path.is_file() or any(path.iterdir())):
            raise StoreError(expected("an empty directory or an lst store at --out", f"'{path}' holds something else",
                                      "Choose another --out; lst never deletes what it did not write."))
        if manifest is not None:
            if cfg.overwrite:
                shutil.rmtree(path)
            elif manifest.get("complete"):
                raise StoreError(f"A complete store already exists at '{path}'. Pass --overwrite to replace it.")
            elif manifest.get("request") != request:
                diff = sorted(k for k in request if manifest.get("request", {}).get(k) != request[k])
                raise StoreError(f"An incomplete store at '{path}' was made with other options ({', '.join(diff)}); "
                                 "pass --overwrite to start again, or repeat the original command to resume.")
            else:
                return zarr.open_group(cfg.out, mode="r+"), True
    return zarr.open_group(cfg.out, mode="w" if cfg.overwrite else "a"), False


def extract(cfg: ExtractConfig, backbone: Backbone | None = None) -> dict[str, Any]:
    """Run the whole extraction; returns the final manifest."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = backbone.tokenizer if backbone else AutoTokenizer.from_pretrained(cfg.model)
    model_config = backbone.config if backbone else AutoConfig.from_pretrained(cfg.model)
    if getattr(model_config, "is_encoder_decoder", False):  # T5: encoder + teacher-forced decoder states
        from .seq2seq import extract_seq2seq

        return extract_seq2seq(cfg, backbone)
    n_blocks = int(model_config.num_hidden_layers)
    layers = list(range(n_blocks + 1)) if cfg.layers is None else sorted(set(cfg.layers))
    if layers[0] < 0 or layers[-1] > n_blocks:
        raise StoreError(expected(f"--layers within 0..{n_blocks} (0 = embedding output)", layers))
    plans, meta = plan_splits(cfg, tokenizer)
    d = int(model_config.hidden_size)
    bytes_per_token = len(layers) * d * np.dtype(S.ZARR_DTYPES[cfg.store_dtype]).itemsize
    shard_tokens = _shard_tokens(cfg, bytes_per_token)
    summary = preflight(plans, layers, bytes_per_token, shard_tokens)
    log.info("%s", summary["text"])

    backbone = backbone or load_backbone(cfg.model, cfg.precision, cfg.device)
    request = {"model": backbone.name, "revision": backbone.revision, "dataset_fingerprint": meta["dataset"]["fingerprint"],
               "splits": sorted(plans), "max_length": cfg.max_length, "layers": layers, "store_dtype": cfg.store_dtype,
               "precision": cfg.precision, "shard_tokens": shard_tokens, "chunk_tokens": cfg.chunk_tokens,
               "columns": meta["dataset"]["columns"], "task": meta["task"]["type"]}
    group, resuming = open_for_write(cfg, request)
    manifest = S.new_manifest(
        request=request,
        backbone={"name": backbone.name, "revision": backbone.revision, "model_type": model_config.model_type,
                  "num_layers": n_blocks, "hidden_size": d, "config": model_config.to_dict()},
        tokenizer={"name": backbone.name, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id},
        layers=layers, hidden_size=d, precision=cfg.precision, store_dtype=cfg.store_dtype,
        max_length=cfg.max_length, bytes_per_token=bytes_per_token, **meta,
        splits={name: {"examples": len(p.input_ids), "tokens": p.n_tokens, "truncated": p.truncated,
                       "rejected_rows": p.rejected_rows, "labelled": p.labels is not None,
                       "shards": math.ceil(p.n_tokens / shard_tokens)} for name, p in plans.items()},
        extract_config={k: v for k, v in asdict(cfg).items() if k != "overwrite"},
    )
    if not resuming:
        group.attrs[S.MANIFEST_KEY] = manifest
        for plan in plans.values():
            _create_split(group, plan, len(layers), d, cfg, shard_tokens)
    _extract_shards(group, plans, backbone, layers, cfg, shard_tokens, summary["tokens"])
    manifest["complete"] = True
    group.attrs[S.MANIFEST_KEY] = manifest
    return manifest


def preflight(plans: dict[str, SplitPlan], layers: list[int], bytes_per_token: int, shard_tokens: int) -> dict[str, Any]:
    """What the extraction will write, known before the backbone loads."""
    tokens = sum(p.n_tokens for p in plans.values())
    rows = [f"{n}: {len(p.input_ids):,} examples, {p.n_tokens:,} tokens, {p.truncated:,} truncated"
            + (f", {p.rejected_rows:,} rejected rows" if p.rejected_rows else "") for n, p in plans.items()]
    shards = sum(math.ceil(p.n_tokens / shard_tokens) for p in plans.values())
    size = tokens * bytes_per_token
    text = (f"{'; '.join(rows)}. {len(layers)} layers, {bytes_per_token:,} bytes/token, "
            f"store ~{size / 2**20:,.1f} MiB in {shards} shards")
    return {"tokens": tokens, "bytes": size, "shards": shards, "text": text}


def _create_split(group: zarr.Group, plan: SplitPlan, n_layers: int, d: int, cfg: ExtractConfig,
                  shard_tokens: int) -> None:
    g = group.require_group(plan.name)
    n_tok = max(plan.n_tokens, 1)
    g.create_array("hidden", shape=(plan.n_tokens, n_layers, d), dtype=S.ZARR_DTYPES[cfg.store_dtype],
                   chunks=(min(cfg.chunk_tokens, n_tok), n_layers, d), shards=(shard_tokens, n_layers, d),
                   compressors=None, fill_value=0, overwrite=True)
    flat_ids = np.fromiter((t for x in plan.input_ids for t in x), dtype=np.int32, count=plan.n_tokens)
    flat_types = np.fromiter((t for x in plan.token_type_ids for t in x), dtype=np.int8, count=plan.n_tokens)
    g.create_array("offsets", data=plan.offsets, overwrite=True)
    g.create_array("input_ids", data=flat_ids, overwrite=True)
    g.create_array("token_type_ids", data=flat_types, overwrite=True)
    if plan.labels is not None:
        g.create_array("labels", data=plan.labels, overwrite=True)
    n_shards = math.ceil(plan.n_tokens / shard_tokens)
    g.create_array("shard_done", shape=(max(n_shards, 1),), dtype="uint8", chunks=(1,), fill_value=0, overwrite=True)


def _extract_shards(group: zarr.Group, plans: dict[str, SplitPlan], backbone: Backbone, layers: list[int],
                    cfg: ExtractConfig, shard_tokens: int, total_tokens: int) -> None:
    pad_id = backbone.tokenizer.pad_token_id or 0
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1) as writer, progress_bar("extract", total_tokens, unit="tok") as bar:
        for plan in plans.values():
            g = group[plan.name]
            done = g["shard_done"][:]
            for k in range(math.ceil(plan.n_tokens / shard_tokens)):
                start, stop = k * shard_tokens, min((k + 1) * shard_tokens, plan.n_tokens)
                if done[k]:
                    bar.advance(stop - start)
                    continue
                buffer = _compute_shard(plan, start, stop, backbone, layers, cfg, pad_id)
                if pending is not None:
                    pending.result()  # at most one shard in flight: bounded memory, errors surface here
                pending = writer.submit(_write_shard, g, k, start, stop, buffer)
                bar.advance(stop - start)
        if pending is not None:
            pending.result()


def _compute_shard(plan: SplitPlan, start: int, stop: int, backbone: Backbone, layers: list[int],
                   cfg: ExtractConfig, pad_id: int) -> np.ndarray:
    d = backbone.hidden_size
    buffer = np.zeros((stop - start, len(layers), d), dtype=S.ZARR_DTYPES[cfg.store_dtype])
    first = int(np.searchsorted(plan.offsets, start, side="right")) - 1
    last = int(np.searchsorted(plan.offsets, stop, side="left"))  # exclusive
    members = sorted(range(first, last), key=lambda i: len(plan.input_ids[i]))  # length-sorted: little padding
    for b in range(0, len(members), cfg.batch_size):
        batch = members[b:b + cfg.batch_size]
        width = max(len(plan.input_ids[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        types = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            n = len(plan.input_ids[i])
            ids[r, :n] = torch.tensor(plan.input_ids[i])
            types[r, :n] = torch.tensor(plan.token_type_ids[i])
            mask[r, :n] = 1
        states = S.encode(backbone.hidden_states(ids, mask, types, layers), cfg.store_dtype)  # (B, T, L, d)
        for r, i in enumerate(batch):
            lo, hi = int(plan.offsets[i]), int(plan.offsets[i + 1])
            a, z = max(lo, start), min(hi, stop)
            buffer[a - start:z - start] = states[r, a - lo:z - lo]
    return buffer


def _write_shard(g: zarr.Group, k: int, start: int, stop: int, buffer: np.ndarray) -> None:
    g["hidden"][start:stop] = buffer  # the whole shard in one write
    g["shard_done"][k] = 1  # recorded only after the data is in place
