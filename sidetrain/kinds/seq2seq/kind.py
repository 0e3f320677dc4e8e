"""The encoder-decoder (T5) store kind in stage 2 (its train half)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.text.t5 import Seq2SeqBackbone

from ...networks.t5 import T5LadderSideNetwork
from ...recipe import Recipe
from ...t5.prune import fisher_scores, pruned_init
from ...t5.recipe import t5_recipe, t5_search_facts
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
        return t5_search_facts(manifest)

    def load_model(self, folder: Path, config: dict[str, Any], device: torch.device) -> Seq2SeqLadderModel:
        from .pretrained import Seq2SeqLadderModel

        return Seq2SeqLadderModel(folder, config, device)
