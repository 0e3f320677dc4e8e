"""The vision-language store kind in stage 2 (its train half): LST with the image tokens as a side prefix
(docs/vision_language.md)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...networks.family import reduction_rule
from ...networks.ladders import stored_blocks
from ...recipe import Recipe, backbone_config
from ...t5.recipe import t5_search_facts
from ..base import SearchFacts, TrainKind
from .predict import pair_up, question_rows
from .recipe import has_t5_text, vision_language_recipe

if TYPE_CHECKING:
    import torch

    from featcache.reader import StoreReader

    from ...config import TrainConfig
    from .pretrained import VisionLanguageLadderModel


class VisionLanguageTrainKind(TrainKind):
    probe = True  # `--head probe`: the question-only floor (the text part is an encoder store's)
    needs_images = True  # `lst predict RUN --text Q --image PATH`, or rows files of (question, image)
    generates = True  # `lst predict --generate` on runs over a T5 text part (refused in one line on others)

    def recipe(self, cfg: TrainConfig, store: StoreReader, device: torch.device, eval_name: str | None) -> Recipe:
        if has_t5_text(store.manifest):
            from .t5_recipe import vision_t5_recipe

            return vision_t5_recipe(cfg, store, device, eval_name)
        return vision_language_recipe(cfg, store, device, eval_name)

    def search_facts(self, manifest: dict[str, Any]) -> SearchFacts:
        if has_t5_text(manifest):
            return t5_search_facts(manifest)
        config = backbone_config(manifest)
        factors, rule = reduction_rule(config)
        return SearchFacts(int(config.hidden_size), int(config.num_attention_heads), tuple(factors), rule,
                           tuple(stored_blocks(manifest["layers"])), stackable=False)

    def load_model(self, folder: Path, config: dict[str, Any], device: torch.device) -> VisionLanguageLadderModel:
        """Its `predict_lines` takes 'image path<TAB>question' lines (what sidetrain.predict builds)."""
        if has_t5_text(config["store_manifest"]):
            from .t5_pretrained import VisionT5LadderModel

            return VisionT5LadderModel(folder, config, device)
        from .pretrained import VisionLanguageLadderModel

        return VisionLanguageLadderModel(folder, config, device)

    def examples(self, config: dict[str, Any], paths: list[str], texts: list[str], images: list[str]) -> list[str]:
        """The inputs of `lst predict` as 'image path<TAB>question' lines: rows files, then --text/--image."""
        questions, found = question_rows(paths, config["store_manifest"]) if paths else ([], [])
        lines = [f"{p}\t{q}" for q, p in zip(questions, found)]
        per_row = int(config["store_manifest"]["vision_language"].get("images_per_row", 1))
        return lines + (pair_up(texts, images, per_row) if texts or images else [])
