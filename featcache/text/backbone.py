"""A frozen text encoder (BERT-family) with its tokenizer, run to per-layer hidden states; shared by the
kinds whose text part is an encoder's (encoder, vision_language)."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BackboneError, expected
from ..loading import PRECISIONS, TORCH_DTYPES, check_model_path, first_line, resolve_device, weights_hash

log = logging.getLogger(__name__)


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
        with self._only_blocks(max(layers)):
            out = self.model(**kwargs, output_hidden_states=True, return_dict=True)
        states = out.hidden_states
        return torch.stack([states[i] for i in layers], dim=2).float()

    @contextmanager
    def _only_blocks(self, k: int) -> Iterator[None]:
        """Early stop: run blocks 0..k-1 only, when layers <= k are all that is asked for.

        Only for encoders whose block list is `encoder.layer` and that have no final norm (BERT,
        RoBERTa, MPNet, ELECTRA): there hidden_states[i] is the raw output of block i-1 whatever
        follows it, so the truncated model gives the same states bit for bit.
        """
        encoder = getattr(self.model, "encoder", None)
        blocks = getattr(encoder, "layer", None)
        # an encoder-level norm after the blocks (XLM-R XL, ...) would touch the last state: run whole
        final_norm = any("norm" in name.lower() for name, _ in encoder.named_children()) if encoder else True
        if not isinstance(blocks, torch.nn.ModuleList) or k >= len(blocks) or final_norm:
            yield
            return
        encoder.layer = torch.nn.ModuleList(list(blocks)[:k])
        try:
            yield
        finally:
            encoder.layer = blocks


def load_tokenizer(name_or_path: str):
    """The backbone's tokenizer only (planning a text store needs no weights)."""
    from transformers import AutoTokenizer

    check_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise BackboneError(f"Could not load backbone '{name_or_path}': {first_line(err)}") from None


def load_backbone(name_or_path: str, precision: str = "fp32", device: str = "auto") -> Backbone:
    """Load a frozen encoder in eval mode. A local directory or a hub id (offline hubs fail clearly)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar covers the long work; a weights bar is noise

    if precision not in PRECISIONS:
        raise BackboneError(expected(f"--precision one of {PRECISIONS}", precision))
    dev = resolve_device(device)
    check_model_path(name_or_path)
    if precision == "fp16" and dev.type == "cpu":
        log.warning("--precision fp16 on a CPU is very slow (no fast fp16 matmul); bf16 or fp32 is faster.")
    local = Path(name_or_path)
    kwargs = {"dtype": TORCH_DTYPES.get(precision, torch.float32)}
    if precision == "int8" and dev.type == "cuda":
        kwargs = _bitsandbytes_int8(dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModel.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise BackboneError(f"Could not load backbone '{name_or_path}': {first_line(err)}") from None
    model.eval().requires_grad_(False)
    if precision == "int8" and dev.type == "cpu":
        # dynamic quantisation: int8 weights, activations quantised per batch; CPU kernels only
        with warnings.catch_warnings():  # torch.ao's deprecation notices say nothing the user can act on
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    if "quantization_config" not in kwargs:
        model.to(dev)  # bitsandbytes places its own weights
    revision = weights_hash(local) if local.is_dir() else str(getattr(model.config, "_commit_hash", None) or "unknown")
    return Backbone(model, tokenizer, str(local.resolve()) if local.exists() else name_or_path,
                    revision, precision, dev)


def _bitsandbytes_int8(device: torch.device) -> dict:
    """from_pretrained arguments for int8 weights on CUDA (LLM.int8 from bitsandbytes)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackboneError(expected("bitsandbytes installed for --precision int8 on CUDA", "it is not installed",
                                     "pip install bitsandbytes, or use --device cpu (torch dynamic quantisation)."))
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": device.index or 0}}
