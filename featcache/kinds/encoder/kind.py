"""The text-encoder kind (BERT-family backbones): per-layer states of every real token of each example,
stored as the text part every text kind shares (featcache/text/part.py says what each split holds)."""

from __future__ import annotations

from typing import Any

from ...config import ExtractConfig
from ...plan import ROOT, KindPlan, RowsFn, check_layers
from ...text.backbone import Backbone, load_backbone, load_tokenizer
from ...text.part import text_fidelity, text_plan, text_rows
from ..registry import ExtractKind


class EncoderExtractKind(ExtractKind):
    name = "encoder"
    precedence = 0  # the lowest: any transformers text model that no more specific kind claims

    def matches(self, cfg: ExtractConfig, config: Any) -> bool:
        return config is not None and hasattr(config, "num_hidden_layers") and hasattr(config, "hidden_size")

    def plan(self, cfg: ExtractConfig, config: Any, backbone: Backbone | None) -> KindPlan:
        tokenizer = backbone.tokenizer if backbone is not None else load_tokenizer(cfg.model)
        n_blocks = int(config.num_hidden_layers)
        return text_plan(cfg, tokenizer, config, check_layers(cfg.layers, n_blocks), int(config.hidden_size),
                         n_blocks)

    def load_backbone(self, cfg: ExtractConfig, device: str) -> Backbone:
        return load_backbone(cfg.model, cfg.precision, device)

    def rows(self, plan: KindPlan, backbone: Backbone, split: str, part: str) -> RowsFn:
        return text_rows(plan.state[split], plan.parts[split][ROOT].layers, backbone)

    def fidelity(self, cfg: ExtractConfig, plan: KindPlan, backbone: Backbone) -> dict[str, Any] | None:
        name = next(iter(plan.state))
        return text_fidelity(cfg, plan.state, plan.parts[name][ROOT].layers, plan.store_dtype, backbone)
