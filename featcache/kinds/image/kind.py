"""The image kind: per-token states of a frozen image model, one row per image (docs/images.md).

Per split S (the image part's tokens: featcache/images/part.py):
    S/hidden          (n_images * T, n_layers, d)
    S/offsets         (n_images + 1,) int64   i * T
    S/input_ids       (n_images * T,) int32   the token's position in its image (0..T-1)
    S/token_type_ids  (n_images * T,) int8    zeros
    S/labels          (n_images,) int64       class indices (manifest task.label_names); absent if unlabelled
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...config import ExtractConfig
from ...errors import BackboneError, DatasetError, expected
from ...images.backbones import ImageBackbone, is_cnn_name, load_image_backbone, vision_config
from ...images.datasets import label_ids, looks_like_images
from ...images.part import image_fidelity, image_model_plan, image_splits
from ...images.prefetch import PixelPrefetcher, decode_threads
from ...plan import ROOT, KindPlan, PartPlan, RowsFn
from ..registry import ExtractKind


class ImageExtractKind(ExtractKind):
    name = "image"
    precedence = 10  # an image model or an image dataset: above the text encoder

    def claims_name(self, model: str) -> bool:
        return is_cnn_name(model)

    def matches(self, cfg: ExtractConfig, config: Any) -> bool:
        return is_cnn_name(cfg.model) or vision_config(config) is not None or \
            looks_like_images(cfg.dataset, cfg.image_column)

    def plan(self, cfg: ExtractConfig, config: Any, backbone: ImageBackbone | None) -> KindPlan:
        if cfg.task == "regression":
            raise DatasetError(expected("--task classification (or auto) for an image store", "regression"))
        if cfg.image_model is not None:  # claimed by name before --image-model was seen
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
