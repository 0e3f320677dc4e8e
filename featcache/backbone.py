"""The frozen backbone: loading it with its tokenizer, and running it to per-layer hidden states."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
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


@dataclass
class Backbone:
    model: torch.nn.Module
    tokenizer: object
    name: str
    revision: str
    precision: str
    device: torch.device

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None, layers: list[int]) -> torch.Tensor:
        """Hidden states of `layers` (0 = embedding output, i = output of block i-1): (B, T, n_layers, d)."""
        kwargs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        if token_type_ids is not None and getattr(self.config, "type_vocab_size", 0):
            kwargs["token_type_ids"] = token_type_ids.to(self.device)
        out = self.model(**kwargs, output_hidden_states=True, return_dict=True)
        states = out.hidden_states
        return torch.stack([states[i] for i in layers], dim=2).float()


def weights_hash(path: Path) -> str:
    """sha256 of the weight files of a local model directory (the 'revision' of a local backbone)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    for p in files:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()[:16] if files else "unknown"


def load_backbone(name_or_path: str, precision: str = "fp32", device: str = "auto") -> Backbone:
    """Load a frozen encoder in eval mode. A local directory or a hub id (offline hubs fail clearly)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar covers the long work; a weights bar is noise

    if precision not in PRECISIONS:
        raise BackboneError(expected(f"--precision one of {PRECISIONS}", precision))
    dev = resolve_device(device)
    local = Path(name_or_path)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if not local.exists() and looks_like_path:
        raise BackboneError(expected("an existing model directory or a hub id", f"'{name_or_path}' (no such path)"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        dtype = TORCH_DTYPES.get(precision, torch.float32)
        model = AutoModel.from_pretrained(name_or_path, dtype=dtype)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"Could not load backbone '{name_or_path}': {first}") from None
    model.eval().requires_grad_(False)
    if precision == "int8":
        model = _quantize_int8(model, dev)
    model.to(dev)
    revision = weights_hash(local) if local.is_dir() else str(getattr(model.config, "_commit_hash", None) or "unknown")
    return Backbone(model, tokenizer, str(local.resolve()) if local.exists() else name_or_path,
                    revision, precision, dev)


def _quantize_int8(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if device.type != "cpu":
        raise BackboneError("int8 compute on CUDA needs bitsandbytes, which is not wired in yet; use --device cpu.")
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
