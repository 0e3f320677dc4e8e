"""The image store kind in stage 2 (its train half): LST on image classification (docs/images.md)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...networks.ladders import stored_blocks
from ...recipe import Recipe, backbone_config
from ..base import SearchFacts, TrainKind
from .model import cnn_heads, reduction_rule
from .recipe import image_recipe, is_cnn

if TYPE_CHECKING:
    import torch

    from featcache.reader import StoreReader

    from ...config import TrainConfig
    from .pretrained import ImageLadderModel


class ImageTrainKind(TrainKind):
    inputs_are_files = True  # `lst predict RUN IMAGE...`
    probe = True  # the probe reads the mean over tokens of the last stored layer (a CNN: every pooled stage)

    def recipe(self, cfg: TrainConfig, store: StoreReader, device: torch.device, eval_name: str | None) -> Recipe:
        return image_recipe(cfg, store, device, eval_name)

    def search_facts(self, manifest: dict[str, Any]) -> SearchFacts:
        from ...config import TrainConfig  # its --reduction-factor default: a field, read at run time

        if is_cnn(manifest):
            image = manifest["image"]
            d = max(image["widths"])
            heads = cnn_heads(d // TrainConfig.reduction_factor)  # ConvSide's default heads at the default r
            factors, rule = reduction_rule(d, heads)
            return SearchFacts(d, heads, tuple(factors), rule, tuple(stored_blocks(image["stages"])),
                               stackable=False)
        config = backbone_config(manifest)
        factors, rule = reduction_rule(int(config.hidden_size), int(config.num_attention_heads))
        return SearchFacts(int(config.hidden_size), int(config.num_attention_heads), tuple(factors), rule,
                           tuple(stored_blocks(manifest["layers"])), stackable=False)

    def load_model(self, folder: Path, config: dict[str, Any], device: torch.device) -> ImageLadderModel:
        from .pretrained import ImageLadderModel

        return ImageLadderModel(folder, config, device)
