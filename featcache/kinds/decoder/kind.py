"""The decoder-only kind (causal LMs: Llama, Qwen2, Mistral, GPT-2, ... through transformers' own classes): the
per-layer states of every real token of each example, stored as the text part every text kind shares
(featcache/text/part.py says what each split holds), taken at the blocks (backbone.py).

A target store (`--label-text` or `--task generate`, targets.py) holds besides, per split, the target part
`S/tgt` (the target tokens' states, teacher-forced after the prompt) and, under `backbone_weights/`, the frozen
final norm and LM head (lm_head.py), so stage 2 trains through the LM head without the backbone."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...config import ExtractConfig
from ...errors import BackboneError, DatasetError, StoreError, expected
from ...fidelity import measure, sample_indices
from ...plan import ROOT, KindPlan, PartPlan, RowsFn, check_layers
from ...text.backbone import load_tokenizer
from ...text.part import text_plan, text_rows
from ..registry import ExtractKind
from .backbone import CausalBackbone, is_causal_lm, load_causal_backbone, load_causal_lm
from .lm_head import frozen_top
from .targets import (
    LABELS,
    TARGET,
    TargetRows,
    check_lengths,
    eos_id,
    label_rows,
    manifest_entry,
    plan_rows,
    read_label_texts,
    target_ids,
    target_mode,
    target_states,
)

POSITION_FIELDS = ("max_position_embeddings", "n_positions")


class DecoderExtractKind(ExtractKind):
    name = "decoder"
    precedence = 5  # above encoder (0), which claims any text config; below image (10) and seq2seq (20)
    free_text_targets = True  # --task generate: targets through the frozen LM head (targets.py)

    def matches(self, cfg: ExtractConfig, config: Any) -> bool:
        return config is not None and is_causal_lm(config)

    def plan(self, cfg: ExtractConfig, config: Any, backbone: CausalBackbone | None) -> KindPlan:
        tokenizer = backbone.tokenizer if backbone is not None else load_tokenizer(cfg.model)
        n_blocks = int(config.num_hidden_layers)
        mode = target_mode(cfg)
        plan = text_plan(cfg, tokenizer, config, check_layers(cfg.layers, n_blocks), int(config.hidden_size),
                         n_blocks)
        for split, parts in plan.parts.items():  # a causal head reads the last token: a row needs one
            empty = int((parts[ROOT].lengths == 0).sum())
            if empty:
                raise DatasetError(expected(f"at least one token in every example of split '{split}'",
                                            f"{empty} example(s) that tokenise to nothing",
                                            "Drop the empty texts (this tokenizer adds no BOS token)."))
        rows = plan_targets(cfg, plan, tokenizer, config, mode) if mode else {}
        positions = next((int(v) for f in POSITION_FIELDS if isinstance(v := getattr(config, f, None), int)), None)
        longest = max(int(p.lengths.max(initial=0)) for parts in plan.parts.values() for p in parts.values())
        longest = max([longest] + [len(plan.state[s].input_ids[r.example(i)]) + len(t)
                                   for s, r in rows.items() for i, t in enumerate(r.targets)])
        if positions is not None and longest > positions:
            raise BackboneError(expected(f"examples within the backbone's {positions} positions",
                                         f"{longest} tokens at --max-length {cfg.max_length}",
                                         f"Use --max-length {positions} or less."))
        # what stage 2 reads besides the shared text facts: states are pre-final-norm, rows right-padded there
        plan.manifest["decoder"] = {"states": "block outputs, before the final norm", "padding": "right",
                                    "pooled_token": "last"}
        if mode:
            plan.manifest["decoder"]["targets"] = plan.request["targets"]
        plan.state = {"splits": plan.state, "targets": rows}
        return plan

    def load_backbone(self, cfg: ExtractConfig, device: str) -> CausalBackbone:
        if target_mode(cfg):  # the LM head and final norm are kept in the store
            return load_causal_lm(cfg.model, cfg.precision, device)
        return load_causal_backbone(cfg.model, cfg.precision, device)

    def rows(self, plan: KindPlan, backbone: CausalBackbone, split: str, part: str) -> RowsFn:
        tokenised = plan.state["splits"][split]
        if part == ROOT:
            return text_rows(tokenised, plan.parts[split][ROOT].layers, backbone)
        if part == TARGET:
            return target_states(tokenised.input_ids, plan.state["targets"][split], plan.parts[split][TARGET].layers,
                                 backbone)
        raise StoreError(expected(f"a part '' or '{TARGET}' of a decoder store", repr(part)))

    def frozen_weights(self, backbone: CausalBackbone) -> dict[str, np.ndarray]:
        """A target store's final norm and LM head (none for a classification store: its backbone has no head)."""
        return frozen_top(backbone) if backbone.lm is not None else {}

    def fidelity(self, cfg: ExtractConfig, plan: KindPlan, backbone: CausalBackbone) -> dict[str, Any] | None:
        """As text_fidelity, but with a causal backbone as the fp32 reference for --precision drift."""
        name, first = next(iter(plan.state["splits"].items()))
        picks = sample_indices(len(first.input_ids), cfg.error_sample)
        if not picks:
            return None
        result = measure(backbone, [first.input_ids[i] for i in picks], [first.token_type_ids[i] for i in picks],
                         plan.parts[name][ROOT].layers, plan.store_dtype, cfg.batch_size,
                         load_fp32=lambda: load_causal_backbone(backbone.name, "fp32", str(backbone.device)))
        result["split"] = name
        return result


def plan_targets(cfg: ExtractConfig, plan: KindPlan, tokenizer, config, mode: str) -> dict[str, TargetRows]:
    """Every split's target rows, added to the plan as the part `tgt` (targets.py); the task becomes the target
    mode's: classification over the label texts, or `generate` (free text, label 1 = "the target itself")."""
    task = plan.manifest["task"]
    eos = eos_id(tokenizer, config)
    texts = cands = None
    if mode == LABELS:
        if task["type"] != "classification":
            raise DatasetError(expected("a classification task for --label-text (labels cast as words)",
                                        task["type"]))
        texts = read_label_texts(task["label_names"], cfg.label_text)
        cands = target_ids(texts, tokenizer, eos, "label")
        if len({tuple(c) for c in cands}) < len(cands):
            raise DatasetError(expected("label texts that tokenise differently", texts, "Change them in --label-text."))
    rows: dict[str, TargetRows] = {}
    for name, split in plan.state.items():
        if mode == LABELS:
            rows[name] = label_rows(name, len(split.input_ids), split.labels, cands)
        else:
            if split.labels is None:
                raise DatasetError(expected(f"a target (the label column) on every row of split '{name}' for "
                                            "--task generate", "an unlabelled split"))
            r = plan_rows(target_ids([task["label_names"][i] for i in split.labels], tokenizer, eos,
                                     f"row of split '{name}', row"),
                          np.zeros(len(split.labels), dtype=np.int32), 1)
            rows[name] = r
            plan.parts[name][ROOT].columns["labels"] = np.ones(len(split.labels), dtype=np.int64)
        check_lengths(name, split.input_ids, rows[name], cfg.max_length, split.truncated)
        root = plan.parts[name][ROOT]
        plan.parts[name][TARGET] = PartPlan(rows[name].offsets, root.layers, root.hidden_size, rows[name].columns())
        plan.split_facts[name].update(target_rows=len(rows[name].targets), target_tokens=rows[name].n_tokens,
                                      targets_per_example=rows[name].per_example)
    if mode != LABELS:  # free text: no label set (the targets are the rows' own texts)
        plan.manifest["task"] = {"type": "generate", "label_names": [], "num_labels": 1}
    plan.request["targets"] = manifest_entry(mode, eos, texts, cands)
    return rows
