"""The store contract between the stages: layout, manifest, and how values are encoded.

A Zarr v3 group. Per split `S`:
    S/hidden          (n_tokens, n_layers, d)  storage dtype; sharded along tokens, one writer per shard
    S/offsets         (n_examples + 1,) int64  example i owns tokens offsets[i]:offsets[i+1]
    S/input_ids       (n_tokens,) int32        real tokens only, no padding
    S/token_type_ids  (n_tokens,) int8
    S/labels          (n_examples,) int64 (classification) or float32 (regression); absent if unlabelled
    S/shard_done      (n_shards,) uint8        1 once shard k of S/hidden is written whole
The group attribute `lst` holds the manifest (see `new_manifest`).
"""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
import torch

from .errors import StoreError, expected

FORMAT_VERSION = 1
MANIFEST_KEY = "lst"
STORE_DTYPES = ("fp32", "fp16", "bf16")
# bf16 has no Zarr dtype: its bits are stored as uint16 and the manifest says what they are.
ZARR_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "uint16"}


def encode(values: torch.Tensor, store_dtype: str) -> np.ndarray:
    """float tensor -> numpy array in the storage dtype."""
    if store_dtype == "fp32":
        return values.float().cpu().numpy()
    if store_dtype == "fp16":
        return values.half().cpu().numpy()
    if store_dtype == "bf16":
        return values.bfloat16().cpu().view(torch.int16).numpy().view(np.uint16)
    raise StoreError(expected(f"a storage dtype in {STORE_DTYPES}", store_dtype))


def decode(values: np.ndarray, store_dtype: str) -> torch.Tensor:
    """numpy array in the storage dtype -> float32 tensor."""
    t = torch.from_numpy(np.ascontiguousarray(values))
    if store_dtype == "bf16":
        return t.view(torch.bfloat16).float()
    return t.float()


def library_versions() -> dict[str, str]:
    import transformers
    import zarr

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "zarr": zarr.__version__, "numpy": np.__version__}


def new_manifest(**fields: Any) -> dict[str, Any]:
    """The manifest: everything stage 2 needs to trust the store. `complete` flips to True last."""
    manifest = {"format_version": FORMAT_VERSION, "complete": False, "versions": library_versions()}
    manifest.update(fields)
    return manifest


def check_manifest(manifest: dict[str, Any] | None, where: str) -> dict[str, Any]:
    if manifest is None:
        raise StoreError(expected("an lst feature store (a Zarr group with an 'lst' manifest)",
                                  f"no manifest at '{where}'", "Create one with `lst extract`."))
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(expected(f"store format version {FORMAT_VERSION}", version,
                                  "Re-extract the store with this version of lst."))
    return manifest


def check_match(what: str, store_value: Any, asked: Any) -> None:
    """Refuse a store that does not hold what the caller asks for, naming both values."""
    if store_value != asked:
        raise StoreError(f"Store mismatch on {what}: the store has {store_value!r}, but {asked!r} was asked for.")
