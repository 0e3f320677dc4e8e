"""The image part of a store, as every kind with an image model stores it (image, vision_language): what one
image model stores per image (`image_model_plan`, known without its weights), the dataset listing, and the
storage error measured on a sample of images.

Per image, T tokens (every image has the same number, so offsets are i * T):
    vision transformer (ViT, DeiT, BEiT, DINOv2, CLIP/SigLIP towers): hidden_states[i] of every token (CLS,
        distillation/register tokens, patches) of the requested layers; d = the model's width
    CNN (efficientnet-lite0..4): ONE stored layer per token = the requested stage maps (0 stem, 1..7 stages,
        8 head conv), each average-pooled to the last stage's grid (7 x 7 at 224 px) and concatenated along
        channels; d = the sum of their widths (manifest `image.widths` says where each starts)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ExtractConfig
from ..errors import BackboneError, expected
from ..fidelity import compare, sample_indices, storage_error
from ..plan import check_layers
from .backbones import (
    ImageBackbone,
    cnn_spec,
    is_cnn_name,
    load_image_backbone,
    load_processor,
    processor_size,
    tokens_per_image,
    vision_config,
)
from .datasets import ImageSplit, load_image_splits, scan
from .prefetch import PixelPrefetcher, decode_threads


def image_splits(cfg: ExtractConfig):
    """The listing, labels and content scan of an image extraction request (also what --online re-reads)."""
    found, columns = load_image_splits(cfg.dataset, cfg.image_column, cfg.label_column, cfg.splits,
                                       cfg.quoting, cfg.header)
    fingerprint, modes = scan(found)
    return found, columns, fingerprint, modes


@dataclass
class ImageModelPlan:
    """What an image model stores per image, known without its weights (the image and vision-language kinds)."""

    stages: list[int]  # what `hidden_states` is asked for: layer indices, or a CNN's stages
    layers: list[int]  # the stored layer indices ([0] for a CNN: its stages concatenated into one vector)
    width: int  # d of a stored token
    tokens: int  # T, tokens per image
    backbone: dict[str, Any]  # the manifest's backbone facts (model_type, num_layers, hidden_size, config)
    image: dict[str, Any]  # the manifest's `image` facts (family, image_size, tokens, grid, widths, ...)


def image_model_plan(model: str, asked: list[int] | None, config: Any,
                     backbone: ImageBackbone | None) -> ImageModelPlan:
    """The layout of one image model's tokens: `asked` layers (None: all), `config` its transformers config
    (None for a named CNN), `backbone` the loaded model if there is one (its processor is then reused)."""
    if is_cnn_name(model):
        spec = cnn_spec(model)
        stages = check_layers(asked, len(spec.widths) - 1)
        width = sum(spec.widths[k] for k in stages)
        tokens, layers, n_blocks = spec.grid * spec.grid, [0], len(spec.widths) - 1
        backbone_facts = {"model_type": "efficientnet-lite", "num_layers": n_blocks, "hidden_size": width,
                          "config": None}
        starts = np.cumsum([0] + [spec.widths[k] for k in stages]).tolist()
        image = {"family": "cnn", "image_size": [spec.image_size] * 2, "tokens": tokens,
                 "grid": [spec.grid, spec.grid], "stages": stages,
                 "widths": [spec.widths[k] for k in stages], "channel_starts": starts[:-1],
                 "preprocess": "RGB, bicubic resize to the model's size, (x/255 - 0.5)/0.5"}
        return ImageModelPlan(stages, layers, width, tokens, backbone_facts, image)
    vision = vision_config(config)
    if vision is None:
        got = f"'{model}' ({type(config).__name__ if config is not None else 'no config'})"
        raise BackboneError(expected("an image model for an image dataset: a transformers vision model "
                                     "folder (ViT, DeiT, BEiT, DINOv2, CLIP/SigLIP) with its image "
                                     "processor, or efficientnet-lite0", got))
    processor = backbone.processor if backbone is not None else load_processor(model)
    size = processor_size(processor)
    n_blocks, width = int(vision.num_hidden_layers), int(vision.hidden_size)
    layers = stages = check_layers(asked, n_blocks)
    tokens = tokens_per_image(vision, size)
    backbone_facts = {"model_type": vision.model_type, "num_layers": n_blocks, "hidden_size": width,
                      "config": vision.to_dict()}
    image = {"family": "transformer", "image_size": list(size), "tokens": tokens,
             "preprocess": f"{type(processor).__name__} from the model folder"}
    return ImageModelPlan(stages, layers, width, tokens, backbone_facts, image)


def image_fidelity(model: str, images: ImageSplit, stages: list[int], backbone: ImageBackbone,
                   error_sample: int) -> dict[str, Any] | None:
    """Storage error (and precision drift against fp32) of an image model's states on `error_sample` images."""
    picks = sample_indices(len(images.items), error_sample)
    if not picks:
        return None
    prefetch = PixelPrefetcher(images, backbone, decode_threads())
    try:
        pixels = prefetch.get(picks)
    finally:
        prefetch.close()

    def states(bb: ImageBackbone) -> torch.Tensor:
        out = [bb.hidden_states(pixels[b:b + 8], stages).cpu() for b in range(0, len(picks), 8)]
        return torch.cat(out).flatten(0, 1)  # (N tokens, L, d)

    computed = states(backbone)
    result: dict[str, Any] = {"examples": len(picks), "tokens": int(computed.shape[0]),
                              "storage_error": storage_error(computed), "precision": backbone.precision}
    if backbone.precision != "fp32":
        reference = states(load_image_backbone(model, "fp32", str(backbone.device)))
        result["precision_drift"] = compare(reference, computed)
    return result
