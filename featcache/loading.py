"""What every frozen backbone's loader shares, whatever its kind: the device, the compute precisions, the
weights' hash (a local backbone's revision), the transformers config, and one-line load errors."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from .errors import BackboneError, expected

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError(expected("a CUDA device for --device cuda", "none available", "Use --device cpu."))
    return torch.device(device)


def weights_hash(path: Path) -> str:
    """sha256 of the weight files of a local model directory (the 'revision' of a local backbone)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    for p in files:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()[:16] if files else "unknown"


def check_model_path(name_or_path: str) -> None:
    """Fail fast on a path that does not exist (before any hub lookup turns it into a long trace)."""
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path and not Path(name_or_path).expanduser().exists():
        raise BackboneError(expected("an existing model directory or a hub id", f"'{name_or_path}' (no such path)",
                                     "Check the MODEL argument."))


def load_model_config(name_or_path: str):
    """The backbone's transformers config (what picks the kind of store), without the weights."""
    from transformers import AutoConfig

    check_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise BackboneError(f"Could not load backbone '{name_or_path}': {first_line(err)}") from None


def first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


