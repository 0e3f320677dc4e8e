"""The store contract between the stages: layout, manifest, and how values are encoded.

A Zarr v3 group. Per split `S`:
    S/hidden          (n_tokens, n_layers, d)  storage dtype; sharded along tokens, one writer per shard
    S/scales          (n_tokens, n_layers) float32  int8 stores only: value = hidden * scale; sharded like hidden
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
STORE_DTYPES = ("fp32", "fp16", "bf16", "int8")
# bf16 has no Zarr dtype: its bits are stored as uint16 and the manifest says what they are.
ZARR_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "uint16", "int8": "int8"}
SCALE_DTYPE = "float32"  # int8 stores: one absmax/127 scale per token and layer


def bytes_per_token(store_dtype: str, n_layers: int, d: int) -> int:
    """Bytes one token takes in the store (values, plus the int8 scales)."""
    size = n_layers * d * np.dtype(ZARR_DTYPES[store_dtype]).itemsize
    return size + (n_layers * np.dtype(SCALE_DTYPE).itemsize if store_dtype == "int8" else 0)


def encode_scaled(values: torch.Tensor, store_dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float tensor (..., d) -> (array in the storage dtype, int8 scales (...) or None)."""
    if store_dtype != "int8":
        return encode(values, store_dtype), None
    x = values.float().cpu()
    scale = x.abs().amax(dim=-1) / 127.0  # (...,): absmax maps to +-127, symmetric, zero stays exact
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero vector stays zero
    q = torch.round(x / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q.numpy(), scale.numpy().astype(SCALE_DTYPE)


def encode(values: torch.Tensor, store_dtype: str) -> np.ndarray:
    """float tensor -> numpy array in the storage dtype (int8 needs `encode_scaled` for its scales)."""
    if store_dtype == "fp32":
        return values.float().cpu().numpy()
    if store_dtype == "fp16":
        return values.half().cpu().numpy()
    if store_dtype == "bf16":
        return values.bfloat16().cpu().view(torch.int16).numpy().view(np.uint16)
    if store_dtype == "int8":
        raise StoreError("int8 values need their scales: use store.encode_scaled.")
    raise StoreError(expected(f"a storage dtype in {STORE_DTYPES}", store_dtype))


def decode(values: np.ndarray, store_dtype: str, scales: np.ndarray | None = None) -> torch.Tensor:
    """numpy array in the storage dtype (+ int8 scales of shape values.shape[:-1]) -> float32 tensor."""
    t = torch.from_numpy(np.ascontiguousarray(values))
    if store_dtype == "bf16":
        return t.view(torch.bfloat16).float()
    if store_dtype == "int8":
        if scales is None:
            raise StoreError(expected("the int8 scales (S/scales) with int8 values", "no scales"))
        return t.float() * torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)).unsqueeze(-1)
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


def check_manifest(manifest: dict[str, Any] | None, where: str, bare: bool = False) -> dict[str, Any]:
    """The manifest, checked; `bare`: the group is empty (an extraction stopped before its manifest)."""
    if manifest is None and bare:
        raise StoreError(expected("a complete feature store", f"no manifest at '{where}' (an empty group: what an "
                                  "extraction stopped before writing the manifest leaves)",
                                  "Re-run the same `lst extract` to resume it."))
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
