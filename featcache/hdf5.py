"""HDF5 interchange (h5py): export a store for tools that read HDF5, and import such a file back.

File layout: every array of the store at the same path, dtype and shape, whatever the store's kind.
Both directions walk the group tree and know no array by name: each split's parts (the split group
itself, `S/dec` for seq2seq stores, whatever later kinds add), each part's `hidden`, `offsets`,
`shard_done`, ids, labels and int8 `scales`, and root groups such as `backbone_weights`; bf16 stays
uint16 bits, as in the store. The root attribute `lst_manifest` holds the manifest as JSON (its
`kind` and `parts` included); each dataset records its Zarr chunk and shard shapes (and each group
its Zarr attributes) so an import rebuilds the same layout. Both directions copy one Zarr shard at a
time: memory stays bounded by a shard (~64 MiB by default), whatever the store size.

Import writes to a local path or any fsspec URL, guarded by `destination.prepare_out`; export writes
one local file (written as `<out>.partial`, then renamed).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import store as S
from .destination import IMPORTING, prepare_out, zarr_location
from .errors import StoreError, expected
from .inspect import open_manifest
from .lease import writer_lease
from .progress import progress_bar

log = logging.getLogger(__name__)

FORMATS = ("hdf5",)
H5_FORMAT = "lst-hdf5"
H5_FORMAT_VERSION = 1
MANIFEST_ATTR = "lst_manifest"
ZARR_ATTRS = "zarr_attributes"  # JSON of a Zarr node's own attributes (the root's are the manifest)
BLOCK_BYTES = 64 << 20  # rows copied per step when an array is not sharded


def _block_rows(array: zarr.Array) -> int:
    """Rows per copy step: one Zarr shard (read whole, written whole), else ~64 MiB."""
    if array.shards is not None:
        return int(array.shards[0])
    row_bytes = max(1, int(np.prod(array.shape[1:])) * array.dtype.itemsize)
    return max(1, BLOCK_BYTES // row_bytes)


def _check_out_file(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise StoreError(expected(f"no file at '{out}'", "an existing file", "Pass --overwrite to replace it."))
    if out.exists() and not out.is_file():
        raise StoreError(expected("a file path for the HDF5 output", f"'{out}', a directory",
                                  "Choose a file name such as store.h5."))
    if not out.parent.exists():
        raise StoreError(expected("an existing folder for the HDF5 output", f"'{out.parent}' (no such folder)"))


def export_hdf5(store: str | Path, out: str | Path, overwrite: bool = False, fmt: str = "hdf5") -> Path:
    """Write a complete store to one HDF5 file; returns its path. Written to a temp file, then renamed."""
    import h5py

    if fmt not in FORMATS:
        raise StoreError(expected(f"--format one of {FORMATS}", fmt))
    group, manifest = open_manifest(store)
    if not manifest.get("complete"):
        raise StoreError(f"The store at '{store}' is incomplete; finish it (re-run the same `lst extract`) "
                         "before exporting.")
    out = Path(out)
    _check_out_file(out, overwrite)
    tmp = out.with_name(out.name + ".partial")
    nodes = list(group.members(max_depth=None))
    arrays = [(path, node) for path, node in nodes if isinstance(node, zarr.Array)]
    total = sum(a.nbytes for _, a in arrays)
    try:
        with h5py.File(tmp, "w") as f, progress_bar("export", total / 2**20, unit="MiB") as bar:
            f.attrs["format"] = H5_FORMAT
            f.attrs["format_version"] = H5_FORMAT_VERSION
            f.attrs[MANIFEST_ATTR] = json.dumps(manifest, sort_keys=True)
            for path, node in nodes:
                if isinstance(node, zarr.Group):
                    h5_group = f.require_group(path)
                    if dict(node.attrs):
                        h5_group.attrs[ZARR_ATTRS] = json.dumps(dict(node.attrs), sort_keys=True)
            for path, array in arrays:
                dset = f.create_dataset(path, shape=array.shape, dtype=array.dtype,
                                        chunks=_h5_chunks(array) if array.size else None)
                dset.attrs["zarr_chunks"] = list(array.chunks)
                if array.shards is not None:
                    dset.attrs["zarr_shards"] = list(array.shards)
                if dict(array.attrs):
                    dset.attrs[ZARR_ATTRS] = json.dumps(dict(array.attrs), sort_keys=True)
                if not array.ndim:
                    dset[()] = array[...]
                    continue
                step = _block_rows(array)
                for a in range(0, array.shape[0], step):
                    block = array[a:a + step]
                    dset[a:a + len(block)] = block
                    bar.advance(block.nbytes / 2**20)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("Exported %s to %s (%.1f MiB)", store, out, out.stat().st_size / 2**20)
    return out


def _h5_chunks(array: zarr.Array) -> tuple[int, ...] | None:
    # HDF5 chunks follow Zarr's inner chunks (the unit of a random read), capped at HDF5's 4 GiB limit
    chunks = tuple(int(c) for c in array.chunks)
    return tuple(min(c, s) for c, s in zip(chunks, array.shape)) if all(array.shape) else None


def read_h5_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an exported HDF5 file, with clear errors for anything else."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise StoreError(expected("an HDF5 file written by `lst export`", f"'{path}' (no such file)"))
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get(MANIFEST_ATTR)
    except OSError:
        raise StoreError(expected("an HDF5 file written by `lst export`", f"'{path}', which is not HDF5")) from None
    if raw is None:
        raise StoreError(expected(f"an HDF5 file with an '{MANIFEST_ATTR}' attribute (written by `lst export`)",
                                  f"'{path}' without one"))
    return S.check_manifest(json.loads(raw), str(path))


def _import_dataset(root: zarr.Group, path: str, dset, bar) -> None:
    parent, _, name = path.rpartition("/")
    g = root.require_group(parent) if parent else root
    shards, chunks = dset.attrs.get("zarr_shards"), dset.attrs.get("zarr_chunks")
    array = g.create_array(name, shape=dset.shape, dtype=dset.dtype, fill_value=0,
                           chunks=tuple(int(c) for c in chunks) if chunks is not None else "auto",
                           shards=tuple(int(c) for c in shards) if shards is not None else None, compressors=None)
    if ZARR_ATTRS in dset.attrs:
        array.attrs.update(json.loads(dset.attrs[ZARR_ATTRS]))
    if not dset.ndim:
        array[...] = dset[()]
        return
    step = _block_rows(array)
    for a in range(0, dset.shape[0], step):
        block = dset[a:a + step]
        array[a:a + len(block)] = block  # one whole shard per write
        bar.advance(block.nbytes / 2**20)


def import_hdf5(h5_path: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Rebuild a Zarr store from an exported HDF5 file; returns the manifest (the same as the source's).

    `out` is a local path or an fsspec URL; `destination.prepare_out` guards it (an lst store is
    replaced only with `overwrite`, anything else is refused and left untouched).
    """
    import h5py

    manifest = read_h5_manifest(h5_path)
    out = str(out)
    with h5py.File(h5_path, "r") as f:
        missing = [split for split in manifest["splits"] if split not in f]
        if missing:
            raise StoreError(expected(f"split(s) {missing} (named in the manifest) in '{h5_path}'", f"groups {sorted(f)}"))
        try:
            with writer_lease(out):  # one writer per store, as for `lst extract`
                prepare_out(out, overwrite)  # refuses to replace a store without --overwrite, or anything not ours
                _write_store(f, out, manifest)
        except OSError as err:  # a full disk, a path under a file, a lost connection: one line, no traceback
            raise StoreError(f"Could not write the store at '{out}' ({type(err).__name__}: {err}); "
                             "what it holds is not marked complete; fix the cause and re-run with --overwrite.") from err
    log.info("Imported %s into %s", h5_path, out)
    return manifest


def _write_store(f, out: str, manifest: dict[str, Any]) -> None:
    import h5py

    root = zarr.open_group(zarr_location(out), mode="w")
    # incomplete until every array is in: a crashed import is never mistaken for a store
    root.attrs[S.MANIFEST_KEY] = {**manifest, "complete": False, IMPORTING: True}
    nodes: list[tuple[str, Any]] = []
    f.visititems(lambda path, node: nodes.append((path, node)))
    total = sum(n.nbytes for _, n in nodes if isinstance(n, h5py.Dataset))
    with progress_bar("import", total / 2**20, unit="MiB") as bar:
        for path, node in nodes:  # parents come before their children
            if isinstance(node, h5py.Group):
                g = root.require_group(path)
                if ZARR_ATTRS in node.attrs:
                    g.attrs.update(json.loads(node.attrs[ZARR_ATTRS]))
                continue
            _import_dataset(root, path, node, bar)
    root.attrs[S.MANIFEST_KEY] = manifest
