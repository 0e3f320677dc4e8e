"""The image kind: per-token states of a frozen image model, one row per image (docs/images.md).

Per split S (every image has the same number of tokens T, so offsets are i * T):
    S/hidden          (n_images * T, n_layers, d)
        vision transformer (ViT, DeiT, BEiT, DINOv2, CLIP/SigLIP towers): hidden_states[i] of every token (CLS,
            distillation/register tokens, patches) of the requested layers; d = the model's width
        CNN (efficientnet-lite0..4): ONE stored layer per token = the requested stage maps (0 stem, 1..7 stages,
            8 head conv), each average-pooled to the last stage's grid (7 x 7 at 224 px) and concatenated along
            channels; d = the sum of their widths (manifest `image.widths` says where each starts)
    S/offsets         (n_images + 1,) int64
    S/input_ids       (n_images * T,) int32   the token's position in its image (0..T-1)
    S/token_type_ids  (n_images * T,) int8    zeros
    S/labels          (n_images,) int64       class indices (manifest task.label_names); absent if unlabelled
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ExtractConfig
from ..errors import BackboneError, DatasetError, expected
from ..fidelity import compare, sample_indices, storage_error
from ..images import (
    ImageBackbone,
    ImageSplit,
    PixelPrefetcher,
    cnn_spec,
    is_cnn_name,
    label_ids,
    load_image_backbone,
    load_image_splits,
    load_processor,
    looks_like_images,
    processor_size,
    scan,
    tokens_per_image,
    vision_config,
)
from ..plan import check_layers
from . import encoder, seq2seq  # noqa: F401 - the text kinds register (and are detected) first
from .registry import ROOT, KindPlan, PartPlan, RowsFn, StoreKind, register_kind


def decode_threads() -> int:
    """Worker threads that decode and preprocess images ahead of the forward."""
    return int(os.environ.get("LST_IMAGE_THREADS") or max(1, min(4, (os.cpu_count() or 2) - 1)))


def image_splits(cfg: ExtractConfig):
    """The listing, labels and content scan of an image extraction request (also what --online re-reads)."""
    found, columns = load_image_splits(cfg.dataset, cfg.image_column, cfg.label_column, cfg.splits,
                                       cfg.quoting, cfg.header)
    fingerprint, modes = scan(found)
    return found, columns, fingerprint, modes


@dataclass
class ImageModelPlan:
    """What an image model stores per image, known without its weights (also used by the vision-language kind)."""

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


class ImageKind(StoreKind):
    name = "image"

    def claims_name(self, model: str) -> bool:
        return is_cnn_name(model)

    def matches(self, cfg: ExtractConfig, config: Any) -> bool:
        return is_cnn_name(cfg.model) or vision_config(config) is not None or \
            looks_like_images(cfg.dataset, cfg.image_column)

    def plan(self, cfg: ExtractConfig, config: Any, backbone: ImageBackbone | None) -> KindPlan:
        if cfg.task == "regression":
            raise DatasetError(expected("--task classification (or auto) for an image store", "regression"))
        if getattr(cfg, "image_model", None) is not None:  # claimed by name before --image-model was seen
            raise BackboneError(expected("a text backbone as MODEL with --image-model (a vision-language store)",
                                         f"the image model '{cfg.model}'"))
        model = image_model_plan(cfg.model, cfg.layers, config, backbone)
        stages, layers, width, tokens, image = model.stages, model.layers, model.width, model.tokens, model.image
        backbone_facts = model.backbone
        found, columns, fingerprint, modes = image_splits(cfg)
        label_names, labels = label_ids(found)
        parts, facts = {}, {}
        for name, split in found.items():
            n = len(split.items)
            offsets = np.arange(n + 1, dtype=np.int64) * tokens
            cols = {"offsets": offsets, "input_ids": np.tile(np.arange(tokens, dtype=np.int32), n),
                    "token_type_ids": np.zeros(n * tokens, dtype=np.int8)}
            if labels[name] is not None:
                cols["labels"] = labels[name]
            parts[name] = {ROOT: PartPlan(offsets, layers, width, cols)}
            facts[name] = {"truncated": 0, "rejected_rows": 0, "labelled": labels[name] is not None,
                           "converted_to_rgb": sum(modes[name].values()), "modes_converted": modes[name]}
        task = {"type": "classification", "label_names": label_names, "num_labels": len(label_names)}
        image["converted_to_rgb"] = {n: sum(m.values()) for n, m in modes.items()}
        request = {"dataset_fingerprint": fingerprint, "splits": sorted(found), "layers": stages,
                   "columns": columns, "task": "classification", "image": {k: image[k] for k in
                                                                         ("family", "image_size", "tokens")}}
        manifest = {"backbone": backbone_facts, "tokenizer": {"image_processor": image["preprocess"]},
                    "layers": layers, "hidden_size": width, "max_length": tokens, "image": image,
                    "dataset": {"source": str(cfg.dataset), "fingerprint": fingerprint, "columns": columns},
                    "task": task}
        return KindPlan(parts, cfg.store_dtype, request, manifest, facts, state=found)

    def load_backbone(self, cfg: ExtractConfig, device: str) -> ImageBackbone:
        return load_image_backbone(cfg.model, cfg.precision, device)

    def rows(self, plan: KindPlan, backbone: ImageBackbone, split: str, part: str) -> RowsFn:
        images = plan.state[split]
        stages = plan.request["layers"]
        prefetch = PixelPrefetcher(images, backbone, decode_threads())

        def compute(items: list[int]) -> list[torch.Tensor]:
            states = backbone.hidden_states(prefetch.get(list(items)), stages).cpu()  # (B, T, L, d)
            return list(states)

        return compute

    def fidelity(self, cfg: ExtractConfig, plan: KindPlan, backbone: ImageBackbone) -> dict[str, Any] | None:
        name, images = next(iter(plan.state.items()))
        result = image_fidelity(cfg.model, images, plan.request["layers"], backbone, cfg.error_sample)
        return None if result is None else {**result, "split": name}


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


register_kind(ImageKind())
