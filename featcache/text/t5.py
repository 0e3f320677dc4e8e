"""The frozen T5 backbone (encoder-decoder, the paper's GLUE setting): loading it, its encoder and
teacher-forced decoder states, and the label texts its decoder is run on. What a T5 store holds is
kind.py's.

States are taken before the stack's final layer norm: transformers' last `hidden_states` entry is
`final_layer_norm(last block output)`, so the blocks are hooked instead. Layer 0 is the embedding
output, layer i the output of block i.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import BackboneError, DatasetError, StoreError, expected
from ..loading import TORCH_DTYPES, resolve_device, weights_hash
from .backbone import Backbone

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"  # gets the gold target only; every other split gets every candidate
# T5's own GLUE target words (t5.data.glue_utils), keyed by the task folder name, lower-case, no '-'/'_'.
GLUE_LABEL_TEXTS: dict[str, dict[str, str]] = {
    "sst2": {"0": "negative", "1": "positive"},
    "cola": {"0": "unacceptable", "1": "acceptable"},
    "mrpc": {"0": "not_equivalent", "1": "equivalent"},
    "qqp": {"0": "not_duplicate", "1": "duplicate"},
    "qnli": {"entailment": "entailment", "not_entailment": "not_entailment"},
    "rte": {"entailment": "entailment", "not_entailment": "not_entailment"},
    "wnli": {"0": "not_entailment", "1": "entailment"},
    "mnli": {"entailment": "entailment", "neutral": "neutral", "contradiction": "contradiction"},
}
FP16_REASON = ("T5's activations exceed float16's range (65504) and overflow to inf/NaN "
               "(a known T5 property; its pre-training used bfloat16)")


@dataclass
class Seq2SeqBackbone(Backbone):
    """A frozen encoder-decoder (T5ForConditionalGeneration) in eval mode, with its tokenizer."""

    @property
    def hidden_size(self) -> int:
        return int(self.config.d_model)

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, mask: torch.Tensor,
               layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids and mask -> states (B, T, n_layers, d) float32, encoder output (B, T, d)."""
        ids, mask = input_ids.to(self.device), mask.to(self.device)
        states, out = _stack_states(self.model.encoder, input_ids=ids, attention_mask=mask)
        return torch.stack([states[i] for i in layers], dim=2).float(), out

    @torch.no_grad()
    def decode(self, decoder_input_ids: torch.Tensor, decoder_mask: torch.Tensor, encoder_out: torch.Tensor,
               encoder_mask: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced decoder: (N, U) ids -> states (N, U, n_layers, d) float32, output (N, U, d)."""
        states, out = _stack_states(self.model.decoder, input_ids=decoder_input_ids.to(self.device),
                                    attention_mask=decoder_mask.to(self.device),
                                    encoder_hidden_states=encoder_out.to(self.device),
                                    encoder_attention_mask=encoder_mask.to(self.device))
        return torch.stack([states[i] for i in layers], dim=2).float(), out

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None, layers: list[int]) -> torch.Tensor:
        """The encoder-only Backbone interface: encoder states (B, T, n_layers, d)."""
        return self.encode(input_ids, attention_mask, layers)[0]


def _stack_states(stack: torch.nn.Module, **kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[embedding output, block 1 output, ..., block L output] before the final layer norm, and the
    stack's output. Hooks, because transformers' last hidden_states entry has the final norm applied."""
    states: list[torch.Tensor] = []
    hooks = [stack.block[0].register_forward_pre_hook(lambda m, args: states.append(args[0]))]
    hooks += [b.register_forward_hook(lambda m, args, out: states.append(out[0])) for b in stack.block]
    try:
        out = stack(**kwargs, use_cache=False, return_dict=True).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    return states, out


def load_seq2seq_backbone(name_or_path: str, precision: str = "fp32", device: str = "auto") -> Seq2SeqBackbone:
    """Load a frozen T5ForConditionalGeneration (the LM head is needed), refusing fp16 and int8 compute."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    check_precision(precision)
    dev = resolve_device(device)
    local = Path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, dtype=TORCH_DTYPES[precision])
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"Could not load backbone '{name_or_path}': {first}") from None
    if getattr(model.config, "model_type", "") != "t5":
        raise BackboneError(expected("a T5 encoder-decoder (the family the seq2seq side network is built from)",
                                     f"model_type '{model.config.model_type}'"))
    model.eval().requires_grad_(False).to(dev)
    revision = weights_hash(local) if local.is_dir() else str(getattr(model.config, "_commit_hash", None) or "unknown")
    return Seq2SeqBackbone(model, tokenizer, str(local.resolve()) if local.exists() else name_or_path,
                           revision, precision, dev)


def check_precision(precision: str) -> None:
    if precision == "fp16":
        raise BackboneError(expected("--precision fp32 or bf16 for T5", "fp16", f"{FP16_REASON}."))
    if precision not in ("fp32", "bf16"):
        raise BackboneError(expected("--precision fp32 or bf16 for T5", precision))


def store_dtype_for_t5(asked: str) -> str:
    """fp16 (the encoder-only default) becomes bf16 with a warning; bf16 and fp32 are kept."""
    if asked == "fp16":
        log.warning("Storing T5 activations as bf16 instead of fp16: %s.", FP16_REASON)
        return "bf16"
    if asked not in ("bf16", "fp32"):
        raise StoreError(expected("--store-dtype bf16 or fp32 for T5", asked))
    return asked


def label_texts(label_names: list[str], dataset: str, override: str | dict[str, str] | None) -> list[str]:
    """One target text per label, in label order: --label-text JSON, else GLUE words, else the names."""
    if isinstance(override, str):
        try:
            override = json.loads(Path(override).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DatasetError(expected("--label-text: a JSON file mapping label -> text",
                                        f"'{override}' ({type(err).__name__})")) from None
    mapping = {str(k): str(v) for k, v in (override or {}).items()}
    if not mapping:
        task = Path(dataset).name.lower().replace("-", "").replace("_", "")
        glue = GLUE_LABEL_TEXTS.get(task, {})
        mapping = glue if set(label_names) <= set(glue) else {}
    missing = [n for n in label_names if override and n not in mapping]
    if missing:
        raise DatasetError(expected(f"a text for every label in --label-text (labels {label_names})",
                                    f"none for {missing}"))
    return [mapping.get(n, n) for n in label_names]


def candidate_ids(texts: list[str], tokenizer, eos_id: int) -> list[list[int]]:
    """Target token ids of each label text, ending in EOS; refuses texts that tokenise alike."""
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) + [eos_id] for t in texts]
    if len({tuple(x) for x in ids}) < len(ids):
        raise DatasetError(expected("label texts that tokenise differently", texts, "Set them with --label-text."))
    return ids


@dataclass
class Seq2SeqPlan:
    """Rows to decode in one split: row r is example r // per_example with candidate candidates[r]."""

    per_example: int
    candidates: np.ndarray  # (n_rows,) int32
    targets: list[list[int]]  # per row
    offsets: np.ndarray  # (n_rows + 1,) int64

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])


def plan_rows(n_examples: int, labels: np.ndarray | None, gold_only: bool, cands: list[list[int]]) -> Seq2SeqPlan:
    if gold_only:
        if labels is None:
            raise DatasetError(expected(f"labels on split '{TRAIN_SPLIT}' (its decoder runs on the gold target)",
                                        "an unlabelled split"))
        rows = labels.astype(np.int32)
    else:
        rows = np.tile(np.arange(len(cands), dtype=np.int32), n_examples)
    targets = [cands[c] for c in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in targets], out=offsets[1:])
    return Seq2SeqPlan(1 if gold_only else len(cands), rows, targets, offsets)


def shift_right(targets: list[list[int]], start_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs [start] + target[:-1], right-padded: ids (N, U), mask (N, U)."""
    width = max(len(t) for t in targets)
    ids = torch.full((len(targets), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(targets), width), dtype=torch.long)
    for r, t in enumerate(targets):
        ids[r, 0] = start_id
        ids[r, 1:len(t)] = torch.tensor(t[:-1], dtype=torch.long)
        mask[r, :len(t)] = 1
    return ids, mask
