"""The encoder-only store kind (BERT-family backbones) in stage 2 (its train half)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...networks.family import reduction_rule
from ...networks.ladders import stored_blocks
from ...recipe import Recipe, backbone_config
from ..base import SearchFacts, TrainKind
from .recipe import encoder_recipe, init_model
from .stacked_model import FusedStack

if TYPE_CHECKING:
    import torch
    from torch import nn

    from featcache.reader import StoreReader

    from ...config import TrainConfig
    from ...networks.encoder_stack import LadderSideNetwork
    from .pretrained import EncoderLadderModel


class EncoderTrainKind(TrainKind):
    probe = True

    def recipe(self, cfg: TrainConfig, store: StoreReader, device: torch.device, eval_name: str | None) -> Recipe:
        return encoder_recipe(cfg, store, device, eval_name)

    def search_facts(self, manifest: dict[str, Any]) -> SearchFacts:
        config = backbone_config(manifest)
        factors, rule = reduction_rule(config)
        return SearchFacts(int(config.hidden_size), int(config.num_attention_heads), tuple(factors), rule,
                           tuple(stored_blocks(manifest["layers"])), stackable=True)

    def load_model(self, folder: Path, config: dict[str, Any], device: torch.device) -> EncoderLadderModel:
        from .pretrained import EncoderLadderModel

        return EncoderLadderModel(folder, config, device)

    def stack_member(self, cfg: TrainConfig, store: StoreReader, device: torch.device) -> LadderSideNetwork:
        return init_model(cfg, store, device)  # --pooling pair: a stacked step passes the batch's token types

    def fuse_stack(self, members: list[nn.Module]) -> FusedStack | None:
        return FusedStack.fuse(members)
