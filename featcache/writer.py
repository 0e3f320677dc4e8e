"""Stage 1: run the frozen backbone once over a dataset and write its per-layer activations.

Work is cut into shards of `shard_tokens` tokens along each split's token axis. A shard is computed
into a buffer and written whole, once, by one writer, then marked done in `S/shard_done`; a crash
leaves some shards unmarked, and re-running the same extraction recomputes only those. Examples
that straddle a shard boundary are computed by both neighbours (a few examples per shard).

Crash safety, in the order things reach the store:
  1. manifest (complete=False, layout_complete=False)   a kill here: the layout is rebuilt on resume
  2. the layout: offsets, input ids, labels, empty hidden/scales, shard_done = 0
  3. manifest (layout_complete=True)
  4. per shard: hidden (+ scales) written whole, then shard_done[k] = 1   a kill: shard k is redone
  5. manifest (complete=True), only once every shard_done is 1; readers refuse anything else.
Local files and object-store puts are atomic (zarr writes a temp file and renames it), so a kill
never leaves half a file behind.
"""

from __future__ import annotations

import errno
import logging
import shutil
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from . import distributed
from . import store as S
from .backbone import Backbone, load_backbone
from .config import ExtractConfig
from .errors import LstError, StoreError, expected
from .fidelity import measure, sample_indices
from .plan import (  # noqa: F401
    Plan,
    SplitPlan,
    _shard_tokens,
    _tokenizer_and_config,
    plan_extraction,
    plan_splits,
    preflight,
)
from .progress import progress_bar

log = logging.getLogger(__name__)


def _is_url(out: str) -> bool:
    return "://" in out


def _existing_contents(out: str) -> tuple[bool, bool]:
    """(exists, holds anything) for a local path or an fsspec URL."""
    if _is_url(out):
        import fsspec

        fs, root = fsspec.core.url_to_fs(out)
        if not fs.exists(root):
            return False, False
        return True, (fs.isfile(root) or bool(fs.ls(root, detail=False)))
    path = Path(out)
    if not path.exists():
        return False, False
    return True, path.is_file() or any(path.iterdir())


def _remove_store(out: str) -> None:
    """Delete an lst store (only ever called on one whose manifest was read)."""
    if _is_url(out):
        import fsspec

        fs, root = fsspec.core.url_to_fs(out)
        fs.rm(root, recursive=True)  # never shutil on a URL
    else:
        # rename first (atomic): a kill during the delete leaves no half store at --out, only a stray folder
        path = Path(out)
        doomed = path.with_name(f".{path.name}.deleting-{uuid.uuid4().hex[:8]}")
        path.rename(doomed)
        shutil.rmtree(doomed)


def open_for_write(cfg: ExtractConfig, request: dict[str, Any]) -> tuple[zarr.Group, bool]:
    """Create the store, or reopen it to resume. Returns (group, resuming).

    `resuming` is False for an incomplete store killed before its layout was complete: the caller
    lays it out again (arrays are created with overwrite=True), and no shard was marked done yet.
    """
    exists, non_empty = _existing_contents(cfg.out)
    if exists and non_empty:
        try:
            found = zarr.open_group(cfg.out, mode="r")
            manifest = found.attrs.get(S.MANIFEST_KEY)
            # a bare group with nothing in it: ours, killed between creating the group and its manifest
            bare = manifest is None and not dict(found.attrs) and not list(found.keys())
        except Exception:  # noqa: BLE001 - anything unreadable is "not a store"
            manifest, bare = None, False
        if bare:
            return zarr.open_group(cfg.out, mode="a"), False
        if manifest is None:
            raise StoreError(expected("an empty directory or an lst store at --out", f"'{cfg.out}' holds something else",
                                      "Choose another --out; lst never deletes what it did not write."))
        if cfg.overwrite:
            _remove_store(cfg.out)
        elif manifest.get("complete"):
            raise StoreError(f"A complete store already exists at '{cfg.out}'. Pass --overwrite to replace it.")
        elif manifest.get("request") != request:
            diff = sorted(k for k in request if manifest.get("request", {}).get(k) != request[k])
            raise StoreError(f"An incomplete store at '{cfg.out}' was made with other options ({', '.join(diff)}); "
                             "pass --overwrite to start again, or repeat the original command to resume.")
        else:
            return zarr.open_group(cfg.out, mode="r+"), bool(manifest.get("layout_complete"))
    return zarr.open_group(cfg.out, mode="a"), False


def extract(cfg: ExtractConfig, backbone: Backbone | None = None) -> dict[str, Any]:
    """Run the whole extraction; returns the final manifest (the pre-flight summary for a dry run).

    Under torchrun every process calls this with the same config: rank 0 lays the store out, each
    rank computes its own block of shards, and rank 0 finalises the manifest after all are done.
    """
    loaded = _tokenizer_and_config(cfg, backbone)
    if cfg.dry_run:  # the caller shows the summary; nothing is written, no weights are loaded
        # (for an encoder-decoder this sizes the encoder states only)
        return {"dry_run": True, "preflight": plan_extraction(cfg, backbone, loaded).summary}
    if getattr(loaded[1], "is_encoder_decoder", False):  # T5: encoder + teacher-forced decoder states
        from .seq2seq import extract_seq2seq

        if distributed.world_size() > 1:  # every rank would write every shard: zarr loses data that way
            raise StoreError(expected("one process for an encoder-decoder backbone",
                                      f"WORLD_SIZE={distributed.world_size()}", "Run lst extract without torchrun."))

        return extract_seq2seq(cfg, backbone)
    ctx = distributed.context()
    try:
        plan = plan_extraction(cfg, backbone, loaded)
        if ctx.is_main:
            log.info("%s", plan.summary["text"])
        return _run(cfg, plan, backbone, ctx)
    finally:
        ctx.close()


def _request(cfg: ExtractConfig, plan: Plan, backbone: Backbone) -> dict[str, Any]:
    """What must match for a resume to continue an earlier run."""
    return {"model": backbone.name, "revision": backbone.revision, "dataset_fingerprint": plan.meta["dataset"]["fingerprint"],
            "splits": sorted(plan.plans), "max_length": cfg.max_length, "layers": plan.layers,
            "store_dtype": cfg.store_dtype, "precision": cfg.precision, "shard_tokens": plan.shard_tokens,
            "chunk_tokens": cfg.chunk_tokens, "columns": plan.meta["dataset"]["columns"],
            "task": plan.meta["task"]["type"]}


def _manifest(cfg: ExtractConfig, plan: Plan, backbone: Backbone, request: dict[str, Any]) -> dict[str, Any]:
    tokenizer, config = plan.tokenizer, plan.model_config
    return S.new_manifest(
        request=request, layout_complete=False,
        backbone={"name": backbone.name, "revision": backbone.revision, "model_type": config.model_type,
                  "num_layers": plan.n_blocks, "hidden_size": plan.hidden_size, "config": config.to_dict()},
        tokenizer={"name": backbone.name, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id},
        layers=plan.layers, hidden_size=plan.hidden_size, precision=cfg.precision, store_dtype=cfg.store_dtype,
        max_length=cfg.max_length, bytes_per_token=plan.bytes_per_token, shard_tokens=plan.shard_tokens, **plan.meta,
        splits={name: {"examples": len(p.input_ids), "tokens": p.n_tokens, "truncated": p.truncated,
                       "rejected_rows": p.rejected_rows, "labelled": p.labels is not None,
                       "shards": p.n_shards(plan.shard_tokens)} for name, p in plan.plans.items()},
        extract_config={k: v for k, v in asdict(cfg).items() if k not in ("overwrite", "dry_run")},
    )


def _fidelity(cfg: ExtractConfig, plan: Plan, backbone: Backbone) -> dict[str, Any] | None:
    first = next(iter(plan.plans.values()))
    picks = sample_indices(len(first.input_ids), cfg.error_sample)
    if not picks:
        return None
    result = measure(backbone, [first.input_ids[i] for i in picks], [first.token_type_ids[i] for i in picks],
                     plan.layers, cfg.store_dtype, cfg.batch_size,
                     load_fp32=lambda: load_backbone(backbone.name, "fp32", str(backbone.device)))
    result["split"] = first.name
    return result


def _setup(cfg: ExtractConfig, plan: Plan, backbone: Backbone, request: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: check --out, measure fidelity, write the manifest and the layout. Returns the manifest."""
    group, resuming = open_for_write(cfg, request)
    manifest = _manifest(cfg, plan, backbone, request)
    fidelity = _fidelity(cfg, plan, backbone)
    if fidelity is not None:
        manifest["fidelity"] = fidelity
    if not resuming:
        group.attrs[S.MANIFEST_KEY] = manifest
        for split in plan.plans.values():
            _create_split(group, split, len(plan.layers), plan.hidden_size, cfg, plan.shard_tokens)
        manifest["layout_complete"] = True
        group.attrs[S.MANIFEST_KEY] = manifest
    else:
        manifest["layout_complete"] = True
        log.info("Resuming the incomplete store at %s", cfg.out)
    return manifest


def _run(cfg: ExtractConfig, plan: Plan, backbone: Backbone | None, ctx: distributed.Context) -> dict[str, Any]:
    backbone = backbone or load_backbone(cfg.model, cfg.precision, ctx.device(cfg.device))
    request = _request(cfg, plan, backbone)
    manifest, setup_error = None, None
    if ctx.is_main:
        try:
            manifest = _with_store_errors(cfg, lambda: _setup(cfg, plan, backbone, request))
        except LstError as err:
            setup_error = err
    failure = ctx.broadcast(None if setup_error is None else str(setup_error))  # no rank waits on a dead rank 0
    if setup_error is not None:
        raise setup_error
    if failure is not None:
        raise StoreError(failure)
    group = zarr.open_group(cfg.out, mode="r+")
    work = ctx.share([(name, k) for name, p in plan.plans.items() for k in range(p.n_shards(plan.shard_tokens))])
    error: LstError | None = None
    try:
        _with_store_errors(cfg, lambda: _extract_shards(group, plan, backbone, cfg, work, show=ctx.is_main))
    except LstError as err:
        error = err
    if not ctx.all_ok(error is None):
        raise error or StoreError(f"Another extraction process failed; the shards this one wrote are kept. "
                                  f"Re-run the same command to resume '{cfg.out}'.")
    final_error: LstError | None = None
    if ctx.is_main:
        try:
            _finalise(cfg, group, plan, manifest)
        except LstError as err:
            final_error = err
    if not ctx.all_ok(final_error is None):  # a barrier that also tells the other ranks rank 0 failed
        raise final_error or StoreError(f"Rank 0 could not finalise '{cfg.out}'. Re-run the same command to resume.")
    return manifest if ctx.is_main else dict(zarr.open_group(cfg.out, mode="r").attrs[S.MANIFEST_KEY])


def _finalise(cfg: ExtractConfig, group: zarr.Group, plan: Plan, manifest: dict[str, Any]) -> None:
    """Flip `complete` only when every shard of every split is recorded done."""
    missing = {name: int((group[name]["shard_done"][:p.n_shards(plan.shard_tokens)] == 0).sum())
               for name, p in plan.plans.items()}
    if any(missing.values()):
        raise StoreError(f"Shards still unwritten in '{cfg.out}': {missing}. Re-run the same command to resume.")
    manifest["complete"] = True
    _with_store_errors(cfg, lambda: group.attrs.__setitem__(S.MANIFEST_KEY, manifest))


def _with_store_errors(cfg: ExtractConfig, fn):
    """Turn an OS-level write failure (disk full, permissions) into a one-line StoreError."""
    try:
        return fn()
    except OSError as err:
        what = "the disk is full (ENOSPC)" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise StoreError(f"Could not write the store at '{cfg.out}': {what}. Shards already written are kept: "
                         "free some space (or fix the path) and re-run the same command to resume.") from None


def _create_split(group: zarr.Group, plan: SplitPlan, n_layers: int, d: int, cfg: ExtractConfig,
                  shard_tokens: int) -> None:
    g = group.require_group(plan.name)
    n_tok = max(plan.n_tokens, 1)
    chunk = min(cfg.chunk_tokens, n_tok)
    g.create_array("hidden", shape=(plan.n_tokens, n_layers, d), dtype=S.ZARR_DTYPES[cfg.store_dtype],
                   chunks=(chunk, n_layers, d), shards=(shard_tokens, n_layers, d),
                   compressors=None, fill_value=0, overwrite=True)
    if cfg.store_dtype == "int8":
        g.create_array("scales", shape=(plan.n_tokens, n_layers), dtype=S.SCALE_DTYPE, chunks=(chunk, n_layers),
                       shards=(shard_tokens, n_layers), compressors=None, fill_value=0, overwrite=True)
    flat_ids = np.fromiter((t for x in plan.input_ids for t in x), dtype=np.int32, count=plan.n_tokens)
    flat_types = np.fromiter((t for x in plan.token_type_ids for t in x), dtype=np.int8, count=plan.n_tokens)
    g.create_array("offsets", data=plan.offsets, overwrite=True)
    g.create_array("input_ids", data=flat_ids, overwrite=True)
    g.create_array("token_type_ids", data=flat_types, overwrite=True)
    if plan.labels is not None:
        g.create_array("labels", data=plan.labels, overwrite=True)
    # one uncompressed byte per shard, each its own chunk: writers of different shards never share a file
    g.create_array("shard_done", shape=(max(plan.n_shards(shard_tokens), 1),), dtype="uint8", chunks=(1,),
                   compressors=None, fill_value=0, overwrite=True)


def _extract_shards(group: zarr.Group, plan: Plan, backbone: Backbone, cfg: ExtractConfig,
                    work: list[tuple[str, int]], show: bool = True) -> None:
    """Compute and write the shards in `work` that are not yet done; one shard in flight to the writer."""
    pad_id = backbone.tokenizer.pad_token_id or 0
    done = {name: group[name]["shard_done"][:] for name in plan.plans}
    sizes = [_bounds(plan.plans[n], k, plan.shard_tokens) for n, k in work]
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1) as writer, \
            progress_bar("extract", sum(b - a for a, b in sizes), unit="tok", disable=not show) as bar:
        for (name, k), (start, stop) in zip(work, sizes):
            if done[name][k]:
                bar.advance(stop - start)
                continue
            split = plan.plans[name]
            buffer = _compute_shard(split, start, stop, backbone, plan.layers, cfg, pad_id)
            if pending is not None:
                pending.result()  # at most one shard in flight: bounded memory, errors surface here
            pending = writer.submit(_write_shard, group[name], k, start, stop, *buffer)
            bar.advance(stop - start)
        if pending is not None:
            pending.result()


def _bounds(split: SplitPlan, k: int, shard_tokens: int) -> tuple[int, int]:
    return k * shard_tokens, min((k + 1) * shard_tokens, split.n_tokens)


def _compute_shard(plan: SplitPlan, start: int, stop: int, backbone: Backbone, layers: list[int],
                   cfg: ExtractConfig, pad_id: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(values (n, L, d) in the storage dtype, int8 scales (n, L) or None) of tokens start:stop."""
    d = backbone.hidden_size
    buffer = np.zeros((stop - start, len(layers), d), dtype=S.ZARR_DTYPES[cfg.store_dtype])
    scales = np.zeros((stop - start, len(layers)), dtype=S.SCALE_DTYPE) if cfg.store_dtype == "int8" else None
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
        states, state_scales = S.encode_scaled(backbone.hidden_states(ids, mask, types, layers), cfg.store_dtype)
        for r, i in enumerate(batch):  # states: (B, T, L, d); scales: (B, T, L)
            lo, hi = int(plan.offsets[i]), int(plan.offsets[i + 1])
            a, z = max(lo, start), min(hi, stop)
            buffer[a - start:z - start] = states[r, a - lo:z - lo]
            if scales is not None:
                scales[a - start:z - start] = state_scales[r, a - lo:z - lo]
    return buffer, scales


def _write_shard(g: zarr.Group, k: int, start: int, stop: int, buffer: np.ndarray, scales: np.ndarray | None) -> None:
    g["hidden"][start:stop] = buffer  # the whole shard in one write
    if scales is not None:
        g["scales"][start:stop] = scales
    g["shard_done"][k] = 1  # recorded only after the data is in place
