"""The encoder-decoder kind (T5, the paper's GLUE setting): encoder states per example, plus the
backbone decoder's states teacher-forced on target texts. What it stores is the shared T5 text part
(featcache/text/t5_part.py, where the layout is described), and nothing else.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...config import ExtractConfig
from ...plan import KindPlan, RowsFn
from ...text.t5 import Seq2SeqBackbone, load_seq2seq_backbone
from ...text.t5_part import finish_t5_manifest, t5_fidelity, t5_frozen_weights, t5_plan, t5_rows
from ..registry import ExtractKind


class Seq2SeqExtractKind(ExtractKind):
    name = "seq2seq"
    precedence = 20  # an encoder-decoder config: above the encoder and image kinds
    free_text_targets = True  # --task generate: each row's target text, teacher-forced (t5_part.py)

    def matches(self, cfg: ExtractConfig, config: Any) -> bool:
        return bool(getattr(config, "is_encoder_decoder", False))

    def plan(self, cfg: ExtractConfig, config: Any, backbone: Seq2SeqBackbone | None) -> KindPlan:
        return t5_plan(cfg, config, backbone)

    def load_backbone(self, cfg: ExtractConfig, device: str) -> Seq2SeqBackbone:
        return load_seq2seq_backbone(cfg.model, cfg.precision, device)

    def rows(self, plan: KindPlan, backbone: Seq2SeqBackbone, split: str, part: str) -> RowsFn:
        return t5_rows(plan.state, plan.parts[split], backbone, split, part)

    def fidelity(self, cfg: ExtractConfig, plan: KindPlan, backbone: Seq2SeqBackbone) -> dict[str, Any] | None:
        first = next(iter(plan.parts))
        return t5_fidelity(cfg, plan.state, plan.parts[first], plan.store_dtype, backbone)

    def frozen_weights(self, backbone: Seq2SeqBackbone) -> dict[str, np.ndarray]:
        return t5_frozen_weights(backbone)

    def finish_manifest(self, manifest: dict[str, Any]) -> None:
        finish_t5_manifest(manifest)
