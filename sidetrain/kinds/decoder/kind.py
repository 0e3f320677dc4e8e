"""The decoder-only store kind (causal LMs) in stage 2 (its train half)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...networks.ladders import stored_blocks
from ...recipe import Recipe, backbone_config
from ..base import SearchFacts, TrainKind
from .lm_recipe import targets_of
from .model import decoder_reduction_rule
from .recipe import decoder_recipe

if TYPE_CHECKING:
    import torch

    from featcache.reader import StoreReader

    from ...config import TrainConfig
    from ...pretrained import LadderModel


class DecoderTrainKind(TrainKind):
    # --head probe (mean-pooled logistic regression) and stacked sweeps are not built for this kind: the flags
    # refuse them in one line (the probe checks it; stack_member is TrainKind's refusal). --generate applies to
    # runs trained through the LM head (a target store); a classification run refuses it (pretrained.py).
    generates = True

    def recipe(self, cfg: TrainConfig, store: StoreReader, device: torch.device, eval_name: str | None) -> Recipe:
        return decoder_recipe(cfg, store, device, eval_name)

    def search_facts(self, manifest: dict[str, Any]) -> SearchFacts:
        config = backbone_config(manifest)
        factors, rule = decoder_reduction_rule(config)
        return SearchFacts(int(config.hidden_size), int(config.num_attention_heads), tuple(factors), rule,
                           tuple(stored_blocks(manifest["layers"])), stackable=False)

    def load_model(self, folder: Path, config: dict[str, Any], device: torch.device) -> LadderModel:
        if targets_of(config["store_manifest"]):  # trained through the LM head
            from .lm_pretrained import DecoderLMLadderModel

            return DecoderLMLadderModel(folder, config, device)
        from .pretrained import DecoderLadderModel

        return DecoderLadderModel(folder, config, device)
