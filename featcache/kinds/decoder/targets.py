"""Targets through the frozen LM head of a decoder store: what each example's target is, and the rows of its
target part.

Two modes, chosen at extraction as the T5 kind chooses its label texts:
    labels   `--label-text map.json`: a closed label set; each label's text is a target, scored by its
             log-likelihood after the prompt. The train split holds the gold label's row, every other split
             one row per candidate label, so evaluation scores candidates from the cache.
    text     `--task generate`: free text; the label column holds each example's target, one row each.

Row r of split S's target part `S/tgt` is example r // C (C: rows per example) followed by its target, run as
one causal sequence: `S/tgt/hidden` holds the states of the target tokens only (the prompt's are the split's
own, `S/hidden`), `S/tgt/target_ids` the target tokens (the text's tokens, then EOS). With the causal mask
a prompt token's state is the same with or without the target after it, so prompts are stored once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...config import ExtractConfig
from ...errors import DatasetError, expected
from ...plan import RowsFn
from ...text.splits import pad_batch

TARGET = "tgt"  # the split's part holding the target rows
TRAIN_SPLIT = "train"  # a closed label set: the gold target here, every candidate elsewhere
LABELS, TEXT = "labels", "text"
GENERATE_TASK = "generate"  # --task generate: free-text targets from the label column


def target_mode(cfg: ExtractConfig) -> str | None:
    """labels (--label-text), text (--task generate), or None: a classification or regression store."""
    if cfg.task == GENERATE_TASK and cfg.label_text is not None:
        raise DatasetError(expected("--label-text (a closed label set, scored) or --task generate (free text), "
                                    "not both", "both", "Drop one."))
    if cfg.task == GENERATE_TASK:
        return TEXT
    return LABELS if cfg.label_text is not None else None


def read_label_texts(label_names: list[str], path: str) -> list[str]:
    """One target text per label, in label order, from --label-text (a JSON object label -> text)."""
    try:
        mapping = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DatasetError(expected("--label-text: a JSON file mapping label -> text",
                                    f"'{path}' ({type(err).__name__})")) from None
    if not isinstance(mapping, dict):
        raise DatasetError(expected("--label-text: a JSON object mapping label -> text", type(mapping).__name__))
    mapping = {str(k): str(v) for k, v in mapping.items()}
    missing = [n for n in label_names if n not in mapping]
    if missing:
        raise DatasetError(expected(f"a text for every label in --label-text (labels {label_names})",
                                    f"none for {missing}"))
    return [mapping[n] for n in label_names]


def eos_id(tokenizer, config) -> int:
    """The token that ends every target (the tokenizer's EOS, else the config's first)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if not isinstance(eos, int):
        raise DatasetError(expected("an EOS token (tokenizer or config) to end each target", "none",
                                    "Set eos_token in the tokenizer."))
    return eos


def target_ids(texts: list[str], tokenizer, eos: int, what: str) -> list[list[int]]:
    """Each text's tokens (no special tokens added) then EOS; refuses a text that tokenises to nothing."""
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise DatasetError(expected(f"a non-empty target for every {what}",
                                    f"{len(empty)} empty target(s) (first: {what} {empty[0]}, {texts[empty[0]]!r})",
                                    "Give every row a target text."))
    return [x + [eos] for x in ids]


@dataclass
class TargetRows:
    """The target rows of one split: row r is example r // per_example followed by targets[r]."""

    per_example: int
    candidates: np.ndarray  # (n_rows,) int32: the label scored (labels), 0 (text)
    targets: list[list[int]]  # per row, ending in EOS
    offsets: np.ndarray  # (n_rows + 1,) int64

    def example(self, row: int) -> int:
        return row // self.per_example

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def columns(self) -> dict[str, np.ndarray]:
        return {"offsets": self.offsets, "candidates": self.candidates,
                "target_ids": np.asarray([t for x in self.targets for t in x], dtype=np.int32)}


def plan_rows(targets: list[list[int]], candidates: np.ndarray, per_example: int) -> TargetRows:
    offsets = np.zeros(len(targets) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in targets], out=offsets[1:])
    return TargetRows(per_example, candidates.astype(np.int32), targets, offsets)


def label_rows(split: str, n_examples: int, labels: np.ndarray | None, cands: list[list[int]]) -> TargetRows:
    """A closed label set: the gold label's target on the train split, every candidate elsewhere."""
    if split == TRAIN_SPLIT:
        if labels is None:
            raise DatasetError(expected(f"labels on split '{TRAIN_SPLIT}' (it is trained on the gold target)",
                                        "an unlabelled split"))
        rows = labels.astype(np.int32)
        return plan_rows([cands[c] for c in rows], rows, 1)
    rows = np.tile(np.arange(len(cands), dtype=np.int32), n_examples)
    return plan_rows([cands[c] for c in rows], rows, len(cands))


def check_lengths(split: str, prompts: list[list[int]], rows: TargetRows, max_length: int, truncated: int) -> None:
    """A target store never cuts a prompt, and prompt + target fits --max-length."""
    if truncated:
        raise DatasetError(expected(f"prompts within --max-length {max_length} tokens (a prompt cut short would "
                                    "be trained to continue text it never showed)",
                                    f"{truncated} longer prompt(s) in split '{split}'",
                                    "Raise --max-length or shorten those prompts."))
    total = np.array([len(prompts[rows.example(r)]) + len(t) for r, t in enumerate(rows.targets)])
    over = int((total > max_length).sum())
    if over:
        raise DatasetError(expected(f"prompt + target within --max-length {max_length} tokens",
                                    f"{over} row(s) of split '{split}' up to {int(total.max())} tokens",
                                    f"Raise --max-length to {int(total.max())} or shorten them."))


def target_states(prompts: list[list[int]], rows: TargetRows, layers: list[int], backbone) -> RowsFn:
    """Rows of the target part: each row's prompt + target run as one causal sequence (right-padded), the
    target tokens' states kept: (len(target), n_layers, d)."""
    pad_id = backbone.tokenizer.pad_token_id or 0

    def compute(items: list[int]) -> list[torch.Tensor]:
        starts = [len(prompts[rows.example(r)]) for r in items]
        ids, mask = pad_batch([prompts[rows.example(r)] + rows.targets[r] for r in items], pad_id)
        states = backbone.hidden_states(ids, mask, None, layers).cpu()  # (N, T, L, d)
        return [states[k, s:s + len(rows.targets[r])] for k, (r, s) in enumerate(zip(items, starts))]

    return compute


def manifest_entry(mode: str, eos: int, label_texts: list[str] | None, cands: list[list[int]] | None) -> dict[str, Any]:
    """manifest["decoder"]["targets"]: what stage 2 reads to train and predict through the LM head."""
    entry: dict[str, Any] = {"mode": mode, "part": TARGET, "eos_token_id": eos, "train_split": TRAIN_SPLIT,
                             "frozen": "backbone_weights/: lm_head (vocab, d), final_norm_weight (d), final_norm_eps, "
                                       "final_norm_bias (LayerNorm families), lm_head_bias (where the head has one)"}
    if mode == LABELS:
        entry.update(label_texts=label_texts, candidate_ids=cands)
    return entry
