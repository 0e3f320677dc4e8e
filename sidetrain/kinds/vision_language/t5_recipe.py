"""The Recipe of a vision-language store over a T5 text backbone: the shared T5 recipe (sidetrain/t5/recipe.py:
teacher-forced answer texts, candidates scored from the cache) with the VL-T5 side network (t5_model.py) and
the T5 text part's batches carrying each row's image tokens (data.py), stored or, for --online, from both
backbones live. `--init pruned` prunes the text-only T5 by Fisher information on the text part, as the paper."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from featcache.kinds.vision_language.kind import store_images
from featcache.reader import StoreReader
from featcache.text.t5 import Seq2SeqBackbone

from ...data import mappable
from ...recipe import Recipe, labelled_splits
from ...t5.prune import fisher_scores, pruned_init
from ...t5.recipe import build_seq2seq_model, sources, store_weights, t5_recipe
from .data import LiveImages, StoredImages, WithImages, channel_stats, image_part
from .recipe import VL_RUN_KEYS, image_layers, image_width, images_per_row, load_image_model
from .t5_model import VisionT5Side

if TYPE_CHECKING:
    from ...config import TrainConfig


def build_vision_t5(cfg: TrainConfig, manifest: dict[str, Any], weights: dict[str, torch.Tensor],
                    decoder_layers: list[int] | None = None) -> VisionT5Side:
    """The VL-T5 side network `cfg` trains, or a run's (`weights`: the frozen LM head, and the backbone's
    relative biases where block 0 starts from them)."""
    return build_seq2seq_model(cfg, manifest, weights, decoder_layers, network=VisionT5Side,
                               image_width=image_width(manifest), image_tokens=int(manifest["image"]["tokens"]),
                               images=images_per_row(manifest))


def vision_t5_recipe(cfg: TrainConfig, store: StoreReader, device: torch.device, eval_name: str | None) -> Recipe:
    manifest = store.manifest

    def build() -> VisionT5Side:
        model = build_vision_t5(cfg, manifest, store_weights(store))
        model.visual.mean, model.visual.std = channel_stats(store.split(cfg.train_split))  # cached or online
        return model

    def make_sources(live: Seq2SeqBackbone | None) -> dict[str, Any]:
        text = sources(cfg, store, live)
        names = labelled_splits(store)
        if not cfg.online:
            return {n: WithImages(text[n], StoredImages(store.split(n), text[n].preloaded), mappable(store.split(n)))
                    for n in names}
        image, listed, layers = load_image_model(manifest, str(device)), store_images(manifest), image_layers(manifest)
        return {n: WithImages(text[n], LiveImages(store.split(n), listed[n], image, layers)) for n in names}

    def init(model: VisionT5Side, backbone: Seq2SeqBackbone) -> None:
        pruned_init(model, backbone, fisher_scores(store, backbone))  # the text-only T5's Fisher information

    def images_of(name: str):  # two rows are the same input only with the same images (generated targets)
        return image_part(store.split(name))[1]

    return t5_recipe(cfg, store, device, eval_name, init, build, make_sources, (*VL_RUN_KEYS, "seq2seq"), images_of)
