"""The encoder-decoder (T5) store kind in stage 2 (its train half)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.text.t5 import Seq2SeqBackbone

from ...networks.ladders import stored_blocks
from ...networks.t5 import T5LadderSideNetwork, reduction_rule
from ...recipe import Recipe, backbone_config
from ...t5.prune import fisher_scores, pruned_init
from ...t5.recipe import t5_recipe
from ..base import SearchFacts, TrainKind

if TYPE_CHECKING:
    import torch

    from featcache.reader import StoreReader

    from ...config import TrainConfig
    from .pretrained import Seq2SeqLadderModel


class Seq2SeqTrainKind(TrainKind):
    generates = True  # free text, greedy, with the backbone decoder live

    def recipe(self, cfg: TrainConfig, store: StoreReader, device: torch.device, eval_name: str | None) -> Recipe:
        def init(model: T5LadderSideNetwork, backbone: Seq2SeqBackbone) -> None:
            pruned_init(model, backbone, fisher_scores(store, backbone))  # Fisher scores cached in the store

        return t5_recipe(cfg, store, device, eval_name, init)

    def search_facts(self, manifest: dict[str, Any]) -> SearchFacts:
        config = backbone_config(manifest)
        factors, rule = reduction_rule(config)
        s = manifest["seq2seq"]
        # one --layers for both stacks: the stored blocks of both
        blocks = [x for x in stored_blocks(s["encoder_layers"]) if x in s["decoder_layers"]]
        return SearchFacts(int(config.d_model), int(config.num_heads), tuple(factors), rule, tuple(blocks),
                           stackable=False)

    def load_model(self, folder: Path, config: dict[str, Any], device: torch.device) -> Seq2SeqLadderModel:
        from .pretrained import Seq2SeqLadderModel

        return Seq2SeqLadderModel(folder, config, device)
