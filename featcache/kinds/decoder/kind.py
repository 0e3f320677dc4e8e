"""The decoder-only kind (causal LMs: Llama, Qwen2, Mistral, GPT-2, ... through transformers' own classes): the
per-layer states of every real token of each example, stored as the text part every text kind shares
(featcache/text/part.py says what each split holds), taken at the blocks (backbone.py)."""

from __future__ import annotations

from typing import Any

from ...config import ExtractConfig
from ...errors import BackboneError, DatasetError, expected
from ...fidelity import measure, sample_indices
from ...plan import ROOT, KindPlan, RowsFn, check_layers
from ...text.backbone import load_tokenizer
from ...text.part import text_plan, text_rows
from ..registry import ExtractKind
from .backbone import CausalBackbone, is_causal_lm, load_causal_backbone

POSITION_FIELDS = ("max_position_embeddings", "n_positions")


class DecoderExtractKind(ExtractKind):
    name = "decoder"
    precedence = 5  # above encoder (0), which claims any text config; below image (10) and seq2seq (20)

    def matches(self, cfg: ExtractConfig, config: Any) -> bool:
        return config is not None and is_causal_lm(config)

    def plan(self, cfg: ExtractConfig, config: Any, backbone: CausalBackbone | None) -> KindPlan:
        tokenizer = backbone.tokenizer if backbone is not None else load_tokenizer(cfg.model)
        n_blocks = int(config.num_hidden_layers)
        plan = text_plan(cfg, tokenizer, config, check_layers(cfg.layers, n_blocks), int(config.hidden_size),
                         n_blocks)
        for split, parts in plan.parts.items():  # a causal head reads the last token: a row needs one
            empty = int((parts[ROOT].lengths == 0).sum())
            if empty:
                raise DatasetError(expected(f"at least one token in every example of split '{split}'",
                                            f"{empty} example(s) that tokenise to nothing",
                                            "Drop the empty texts (this tokenizer adds no BOS token)."))
        positions = next((int(v) for f in POSITION_FIELDS if isinstance(v := getattr(config, f, None), int)), None)
        longest = max(int(p.lengths.max(initial=0)) for parts in plan.parts.values() for p in parts.values())
        if positions is not None and longest > positions:
            raise BackboneError(expected(f"examples within the backbone's {positions} positions",
                                         f"{longest} tokens at --max-length {cfg.max_length}",
                                         f"Use --max-length {positions} or less."))
        # what stage 2 reads besides the shared text facts: states are pre-final-norm, rows right-padded there
        plan.manifest["decoder"] = {"states": "block outputs, before the final norm", "padding": "right",
                                    "pooled_token": "last"}
        return plan

    def load_backbone(self, cfg: ExtractConfig, device: str) -> CausalBackbone:
        return load_causal_backbone(cfg.model, cfg.precision, device)

    def rows(self, plan: KindPlan, backbone: CausalBackbone, split: str, part: str) -> RowsFn:
        return text_rows(plan.state[split], plan.parts[split][ROOT].layers, backbone)

    def fidelity(self, cfg: ExtractConfig, plan: KindPlan, backbone: CausalBackbone) -> dict[str, Any] | None:
        """As text_fidelity, but with a causal backbone as the fp32 reference for --precision drift."""
        name, first = next(iter(plan.state.items()))
        picks = sample_indices(len(first.input_ids), cfg.error_sample)
        if not picks:
            return None
        result = measure(backbone, [first.input_ids[i] for i in picks], [first.token_type_ids[i] for i in picks],
                         plan.parts[name][ROOT].layers, plan.store_dtype, cfg.batch_size,
                         load_fp32=lambda: load_causal_backbone(backbone.name, "fp32", str(backbone.device)))
        result["split"] = name
        return result
