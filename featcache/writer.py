"""Stage 1: run the frozen backbone once over a dataset and write its per-layer activations.

One writer for every kind of store (featcache/kinds/): the kind plans the parts of each split and
computes their rows; everything else is here. Work is cut into shards of each part's token axis. A
shard is computed into a buffer and written whole, once, by one writer, then marked done in its
part's `shard_done`; a crash leaves some shards unmarked, and re-running the same extraction
recomputes only those. Rows that straddle a shard boundary are computed by both neighbours.

Crash safety, in the order things reach the store:
  1. manifest (complete=False, layout_complete=False)   a kill here: the layout is rebuilt on resume
  2. the layout: every part's columns, empty hidden/scales, shard_done = 0; frozen weights
  2b. --components: each part's PCA basis, fitted on a seeded sample (compress.py)   a kill: refitted, identically
  3. manifest (layout_complete=True, and the bases' record and checksums)
  4. per shard: hidden (+ scales) written whole, then shard_done[k] = 1   a kill: shard k is redone
  5. manifest (complete=True), only once every shard_done is 1; readers refuse anything else.
Local files and object-store puts are atomic (zarr writes a temp file and renames it), so a kill
never leaves half a file behind. Under torchrun the ranks split the shards of all parts between them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np
import zarr

from . import distributed
from . import store as S
from .compress import (
    Basis,
    apply_components,
    basis_problem,
    compression_request,
    fit_and_store,
    projecting,
    read_bases,
)
from .config import ExtractConfig
from .destination import SOMETHING_ELSE_HINT, describe, remove_store, zarr_location
from .errors import BackboneError, LstError, StoreError, expected
from .kinds import ExtractKind, kind_claiming_name, kind_for_request
from .layout import Layout, create_part, plan_layout
from .lease import writer_lease
from .loading import load_model_config
from .plan import ROOT, KindPlan, PartPlan, RowsFn
from .progress import progress_bar
from .reader import CHECKSUMS, FROZEN_WEIGHTS
from .verify import verify_group

log = logging.getLogger(__name__)


def open_for_write(cfg: ExtractConfig, request: dict[str, Any]) -> tuple[zarr.Group, bool]:
    """Create the store, or reopen it to resume. Returns (group, resuming).

    `resuming` is False for an incomplete store killed before its layout was complete: the caller
    lays it out again (arrays are created with overwrite=True), and no shard was marked done yet.
    What is at --out is checked first (featcache/destination.py): lst only ever replaces its own store.
    """
    where = zarr_location(cfg.out)
    found = describe(cfg.out)
    if found.manifest is not None:
        manifest = found.manifest
        diff = sorted(k for k in request if manifest.get("request", {}).get(k) != request[k])
        if cfg.overwrite:
            remove_store(cfg.out)
        elif diff and manifest.get("complete"):
            raise StoreError(f"A complete store already exists at '{cfg.out}' (made with other options: "
                             f"{', '.join(diff)}). Pass --overwrite to replace it.")
        elif diff:
            raise StoreError(f"An incomplete store at '{cfg.out}' was made with other options ({', '.join(diff)}); "
                             "pass --overwrite to start again, or repeat the original command to resume.")
        else:  # the same extraction again: resume it, or repair a complete one's damaged shards
            group = zarr.open_group(where, mode="r+")
            if manifest.get("complete"):
                _reopen_damaged(cfg, group, manifest)
            return group, bool(manifest.get("layout_complete"))
    elif found.holds_anything and not found.bare:
        raise StoreError(expected("an empty directory or an lst store at --out", f"'{cfg.out}', which holds something else",
                                  SOMETHING_ELSE_HINT))
    return zarr.open_group(where, mode="a"), False


def _reopen_damaged(cfg: ExtractConfig, group: zarr.Group, manifest: dict[str, Any]) -> None:
    """A complete store asked for again: verify every shard and mark the damaged ones to be recomputed."""
    report = verify_group(group, manifest)
    for bad in report["bad"]:
        log.warning("Recomputing shard %d of '%s': %s", bad["shard"], bad["part"], bad["problem"])
        group[bad["part"]]["shard_done"][bad["shard"]] = 0
    if not report["bad"] and not report["bad_bases"]:  # a damaged basis is refitted by _setup
        log.info("The store at %s is complete and all %d shards verify; nothing to do.", cfg.out, report["checked"])


def extract(cfg: ExtractConfig, backbone: Any | None = None) -> dict[str, Any]:
    """Run the whole extraction; returns the final manifest (the pre-flight summary for a dry run).

    Under torchrun every process calls this with the same config: rank 0 lays the store out, each
    rank computes its own block of shards, and rank 0 finalises the manifest after all are done.
    """
    kind, config = _kind_and_config(cfg, backbone)
    plan = kind.plan(cfg, config, backbone)
    apply_components(plan, cfg.components, cfg.components_sample)  # every kind's parts, one code path
    layout = plan_layout(cfg, plan)
    if cfg.dry_run:  # the caller shows the summary; nothing is written, no weights are loaded
        return {"dry_run": True, "preflight": layout.summary}
    ctx = distributed.context()
    try:
        if ctx.is_main:
            log.info("%s", layout.summary["text"])
        return _run(cfg, kind, plan, layout, backbone, ctx)
    finally:
        ctx.close()


def _kind_and_config(cfg: ExtractConfig, backbone: Any | None) -> tuple[ExtractKind, Any]:
    """The kind that extracts this request, and the backbone's transformers config (None for a backbone
    that has none, such as a named CNN a kind knows: the kind then claims it by name)."""
    if backbone is not None:
        return kind_for_request(cfg, getattr(backbone, "config", None)), getattr(backbone, "config", None)
    named = kind_claiming_name(cfg.model)
    if named is not None:  # a name a kind knows (efficientnet-lite0): no config lookup, no hub request
        return named, None
    try:
        config = load_model_config(cfg.model)
    except BackboneError as err:
        try:
            return kind_for_request(cfg, None), None
        except BackboneError:
            raise err from None
    return kind_for_request(cfg, config), config


def _request(cfg: ExtractConfig, kind: ExtractKind, plan: KindPlan, layout: Layout, backbone: Any) -> dict[str, Any]:
    """What must match for a resume to continue an earlier run."""
    return {"kind": kind.name, "model": backbone.name, "revision": backbone.revision, **plan.request,
            "store_dtype": plan.store_dtype, "precision": cfg.precision, "shard_tokens": layout.shard_tokens,
            "chunk_tokens": cfg.chunk_tokens,
            **compression_request(cfg.components, cfg.components_sample, cfg.components_seed)}


def _manifest(cfg: ExtractConfig, kind: ExtractKind, plan: KindPlan, layout: Layout, backbone: Any,
              request: dict[str, Any]) -> dict[str, Any]:
    fields = {k: dict(v) if isinstance(v, dict) else v for k, v in plan.manifest.items()}
    fields["backbone"] = {"name": backbone.name, "revision": backbone.revision, **fields.get("backbone", {})}
    if "tokenizer" in fields:
        fields["tokenizer"] = {"name": backbone.name, **fields["tokenizer"]}
    first = next(iter(plan.parts.values()))
    splits = {}
    for name in plan.parts:
        facts = layout.summary["splits"][name]
        splits[name] = {"examples": facts["examples"], "tokens": facts["tokens"], **plan.split_facts[name],
                        "shards": facts["shards"], "parts": facts["parts"]}
    manifest = S.new_manifest(
        kind=kind.name, request=request, layout_complete=False, **fields, precision=cfg.precision,
        store_dtype=plan.store_dtype, bytes_per_token=layout.bytes_per_token[ROOT],
        shard_tokens=layout.shard_tokens[ROOT],
        parts={p: {"layers": part.layers, "hidden_size": part.hidden_size,
                   "bytes_per_token": layout.bytes_per_token[p], "shard_tokens": layout.shard_tokens[p],
                   **({"components": part.components} if part.components else {})}
               for p, part in first.items()},
        splits=splits,
        extract_config={**{k: v for k, v in asdict(cfg).items() if k not in ("overwrite", "dry_run")},
                        "store_dtype": plan.store_dtype},
    )
    kind.finish_manifest(manifest)
    return manifest


def _setup(cfg: ExtractConfig, kind: ExtractKind, plan: KindPlan, layout: Layout, backbone: Any,
           request: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: check --out, measure fidelity, write the manifest and the layout. Returns the manifest."""
    group, resuming = open_for_write(cfg, request)
    manifest = _manifest(cfg, kind, plan, layout, backbone, request)
    stored = dict(group.attrs.get(S.MANIFEST_KEY) or {}) if resuming else {}
    fidelity = stored.get("fidelity") if resuming else kind.fidelity(cfg, plan, backbone)  # measured once
    if fidelity is not None:
        manifest["fidelity"] = fidelity
    if not resuming:
        group.attrs[S.MANIFEST_KEY] = manifest
        weights = kind.frozen_weights(backbone)
        if weights:
            w = group.require_group(FROZEN_WEIGHTS)
            for name, values in weights.items():
                w.create_array(name, data=values, overwrite=True)
        for split, parts in plan.parts.items():
            _create_split(group, split, parts, plan.store_dtype, cfg.chunk_tokens, layout)
    else:
        log.info("Resuming the incomplete store at %s", cfg.out)
    if cfg.components is not None:  # before any shard: every coefficient is taken on this basis
        manifest["compression"] = _sound_bases(group, plan, stored.get("compression")) or fit_and_store(
            group, plan, lambda split, part: kind.rows(plan, backbone, split, part), cfg.components,
            cfg.components_sample, cfg.components_seed, cfg.batch_size)
    manifest["layout_complete"] = True
    group.attrs[S.MANIFEST_KEY] = manifest
    return manifest


def _sound_bases(group: zarr.Group, plan: KindPlan, record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The recorded bases of a resumed store when every one verifies; else None, with every shard marked to be
    recomputed (its coefficients were taken on the basis that is refitted now)."""
    if not record:
        return None
    bad = {p: problem for p, f in record["parts"].items() if (problem := basis_problem(group, p, f))}
    if not bad:
        return record
    log.warning("Refitting the damaged PCA bases %s and recomputing every shard", bad)
    for split, parts in plan.parts.items():
        for p in parts:
            _part_group(group, split, p)["shard_done"][:] = 0
    return None


def _create_split(group: zarr.Group, split: str, parts: dict[str, PartPlan], store_dtype: str, chunk_tokens: int,
                  layout: Layout) -> None:
    for p, part in parts.items():
        create_part(_part_group(group, split, p, create=True), part, store_dtype, chunk_tokens, layout.shard_tokens[p])


def _part_group(group: zarr.Group, split: str, part: str, create: bool = False) -> zarr.Group:
    path = f"{split}/{part}" if part else split
    return group.require_group(path) if create else group[path]


def _run(cfg: ExtractConfig, kind: ExtractKind, plan: KindPlan, layout: Layout, backbone: Any | None,
         ctx: distributed.Context) -> dict[str, Any]:
    backbone = backbone or kind.load_backbone(cfg, ctx.device(cfg.device))
    request = _request(cfg, kind, plan, layout, backbone)
    with contextlib.ExitStack() as held:  # rank 0 holds the store's lease from setup to finalise
        manifest, setup_error = None, None
        if ctx.is_main:
            try:
                held.enter_context(writer_lease(cfg.out))
                manifest = _with_store_errors(cfg, lambda: _setup(cfg, kind, plan, layout, backbone, request))
            except LstError as err:
                setup_error = err
        failure = ctx.broadcast(None if setup_error is None else str(setup_error))  # no rank waits on a dead rank 0
        if setup_error is not None:
            raise setup_error
        if failure is not None:
            raise StoreError(failure)
        group = zarr.open_group(zarr_location(cfg.out), mode="r+")
        # every rank reads the bases rank 0 fitted (checked against their recorded checksums)
        bases = read_bases(group, group.attrs[S.MANIFEST_KEY].get("compression"), cfg.out)
        work = ctx.share([(split, p, k) for split, parts in plan.parts.items() for p, part in parts.items()
                          for k in range(layout.n_shards(p, part))])
        error: LstError | None = None
        try:
            _with_store_errors(cfg, lambda: _extract_shards(group, kind, plan, layout, backbone, cfg, work,
                                                            show=ctx.is_main, bases=bases))
        except LstError as err:
            error = err
        if not ctx.all_ok(error is None):
            raise error or StoreError(f"Another extraction process failed; the shards this one wrote are kept. "
                                      f"Re-run the same command to resume '{cfg.out}'.")
        final_error: LstError | None = None
        if ctx.is_main:
            try:
                _finalise(cfg, group, plan, layout, manifest)
            except LstError as err:
                final_error = err
        if not ctx.all_ok(final_error is None):  # a barrier that also tells the other ranks rank 0 failed
            raise final_error or StoreError(f"Rank 0 could not finalise '{cfg.out}'. "
                                            "Re-run the same command to resume.")
    return manifest if ctx.is_main else dict(zarr.open_group(zarr_location(cfg.out), mode="r").attrs[S.MANIFEST_KEY])


def _finalise(cfg: ExtractConfig, group: zarr.Group, plan: KindPlan, layout: Layout, manifest: dict[str, Any]) -> None:
    """Flip `complete` only when every shard of every part of every split is recorded done."""
    missing = {}
    for split, parts in plan.parts.items():
        for p, part in parts.items():
            done = _part_group(group, split, p)["shard_done"][:layout.n_shards(p, part)]
            if int((done == 0).sum()):
                missing[f"{split}/{p}" if p else split] = int((done == 0).sum())
    if missing:
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


def _extract_shards(group: zarr.Group, kind: ExtractKind, plan: KindPlan, layout: Layout, backbone: Any,
                    cfg: ExtractConfig, work: list[tuple[str, str, int]], show: bool = True,
                    bases: dict[str, Basis] | None = None) -> None:
    """Compute and write the shards in `work` that are not yet done; one shard in flight to the writer.
    `bases`: a compressed store's basis per part; its rows are stored as their coefficients."""
    groups = {(s, p): _part_group(group, s, p) for s, p, _ in work}
    done = {key: g["shard_done"][:] for key, g in groups.items()}
    rows: dict[tuple[str, str], RowsFn] = {}
    sizes = [_bounds(plan.parts[s][p], k, layout.shard_tokens[p]) for s, p, k in work]
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1) as writer, \
            progress_bar("extract", sum(b - a for a, b in sizes), unit="tok", disable=not show) as bar:
        for (split, p, k), (start, stop) in zip(work, sizes):
            if done[split, p][k]:
                bar.advance(stop - start)
                continue
            if (split, p) not in rows:
                rows[split, p] = kind.rows(plan, backbone, split, p)
                if bases and p in bases:
                    rows[split, p] = projecting(rows[split, p], bases[p])
            buffer = _compute_shard(plan.parts[split][p], start, stop, rows[split, p], plan.store_dtype,
                                    cfg.batch_size)
            if pending is not None:
                pending.result()  # at most one shard in flight: bounded memory, errors surface here
            pending = writer.submit(_write_shard, groups[split, p], k, start, stop, *buffer)
            bar.advance(stop - start)
        if pending is not None:
            pending.result()


def _bounds(part: PartPlan, k: int, shard_tokens: int) -> tuple[int, int]:
    return k * shard_tokens, min((k + 1) * shard_tokens, part.n_tokens)


def _compute_shard(part: PartPlan, start: int, stop: int, rows: RowsFn, store_dtype: str,
                   batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(values (n, L, d) in the storage dtype, int8 scales (n, L) or None) of tokens start:stop."""
    n_layers, offsets, lengths = len(part.layers), part.offsets, part.lengths
    buffer = np.zeros((stop - start, n_layers, part.width), dtype=S.ZARR_DTYPES[store_dtype])
    scales = np.zeros((stop - start, n_layers), dtype=S.SCALE_DTYPE) if store_dtype == "int8" else None
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    last = int(np.searchsorted(offsets, stop, side="left"))  # exclusive
    members = sorted(range(first, last), key=lambda i: lengths[i])  # length-sorted: little padding
    for b in range(0, len(members), batch_size):
        batch = members[b:b + batch_size]
        for i, states in zip(batch, rows(batch)):  # states: (len_i, L, d)
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            a, z = max(lo, start), min(hi, stop)
            values, state_scales = S.encode_scaled(states[a - lo:z - lo], store_dtype)
            buffer[a - start:z - start] = values
            if scales is not None:
                scales[a - start:z - start] = state_scales
    return buffer, scales


def _write_shard(g: zarr.Group, k: int, start: int, stop: int, buffer: np.ndarray, scales: np.ndarray | None) -> None:
    crc = zlib.crc32(buffer)  # what readers verify before trusting the shard
    g["hidden"][start:stop] = buffer  # the whole shard in one write
    if scales is not None:
        g["scales"][start:stop] = scales
        crc = zlib.crc32(scales, crc)
    g[CHECKSUMS][k] = crc
    g["shard_done"][k] = 1  # recorded only after the data and its checksum are in place
