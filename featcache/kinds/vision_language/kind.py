"""The vision-language kind (the paper's CLIP-T5 setting, DESIGN.md 1b): a text backbone's states per row
(question) and an image model's tokens per DISTINCT image, stored once however many rows use it.

`lst extract TEXT_MODEL DATA --image-model IMAGE_MODEL [--image-column C] --out STORE`; DATA is a text dataset
(featcache/text/sources.py) whose rows hold a question (--text-column), an answer (--label-column, default
`answer`) and an image (a path, absolute or relative to the data file, or a datasets Image feature).

Per split S:
    S/...             the text part, exactly as the shared text part (featcache/text/part.py):
                      hidden (n_tokens, n_layers, d_text), offsets, input_ids, token_type_ids, labels (n_rows,)
                      int64 answer indices into manifest task.label_names (over the answers of every labelled
                      split, as the text kinds do)
    S/image_index     (n_rows,) int64   the row of this question's image in S/images ((n_rows, k): k images)
    S/images/...      one row per distinct image of split S (deduped by resolved path, or by content for
                      bytes), T tokens each, laid out as the shared image part (featcache/images/part.py):
                      hidden (n_images * T, 1, d_img), offsets i * T, input_ids 0..T-1, token_type_ids zeros
One stored image layer: a vision transformer's last hidden_states entry; a CNN's default stage set (all
nine EfficientNet-Lite stages, each average-pooled to the 7 x 7 grid, concatenated: d_img = 2,096), as the
image kind stores it by default. --layers picks the TEXT layers.

Manifest: `backbone` (the text backbone, as the encoder kind), `image_backbone` (name, revision, model_type,
num_layers, hidden_size, config), `image` (the image kind's facts), `vision_language` (image_column, images
and questions per split, image_layers = what the image model is asked for, image_part), `dataset` with
`image_fingerprint` (the content of every distinct image). The request (what a resume must match) holds both
models and their weights' hashes, both fingerprints, the text layers and the columns.

A T5 text backbone (the paper's CLIP-T5): the text part is the T5 text part instead
(featcache/text/t5_part.py: encoder states per row, S/dec the decoder's states teacher-forced on the answer texts,
the LM head and relative biases under backbone_weights/); the frozen T5 never sees the image, so both stay a
function of the text alone.

Several images per row (`--image-column left,right`, NLVR2): S/image_index is (n_rows, k), the row's images in
column order; every distinct image of the split is still stored once.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...config import ExtractConfig
from ...errors import BackboneError, DatasetError, StoreError, expected
from ...images.backbones import (
    ImageBackbone,
    cnn_weights_path,
    is_cnn_name,
    load_image_backbone,
    vision_config,
)
from ...images.part import image_fidelity, image_model_plan
from ...images.prefetch import PixelPrefetcher, decode_threads
from ...loading import load_model_config, weights_hash
from ...plan import ROOT, KindPlan, PartPlan, RowsFn, check_layers
from ...text.backbone import Backbone, load_backbone, load_tokenizer
from ...text.part import text_fidelity, text_plan, text_rows
from ...text.t5 import load_seq2seq_backbone
from ...text.t5_part import finish_t5_manifest, t5_fidelity, t5_frozen_weights, t5_plan, t5_rows
from ..registry import ExtractKind
from .data import QuestionImages, VisionLanguageData, question_images

IMAGES = "images"  # the part holding one row per distinct image
IMAGE_INDEX = "image_index"  # the text part's per-row column pointing at it


class VisionLanguageBackbone:
    """Both frozen models. The writer records the text backbone as `backbone` (name, revision)."""

    def __init__(self, text: Backbone, image: ImageBackbone) -> None:
        self.text, self.image = text, image
        self.name, self.revision, self.precision, self.device = text.name, text.revision, text.precision, text.device

    @property
    def config(self):
        return self.text.config

    @property
    def tokenizer(self):
        return self.text.tokenizer


def image_identity(model: str) -> tuple[str, str]:
    """(name, revision) of an image model as its loader records them, without loading it."""
    if is_cnn_name(model):
        return model, "sha256:" + hashlib.sha256(cnn_weights_path(model).read_bytes()).hexdigest()[:16]
    path = Path(model)
    return str(path.resolve()), weights_hash(path)


def is_t5(config: Any) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def check_text_backbone(cfg: ExtractConfig, config: Any) -> int:
    """The text backbone's number of blocks; configs without an encoder's fields are refused (a T5 is checked
    by the T5 text part)."""
    got = f"'{cfg.model}' ({type(config).__name__ if config is not None else 'no config'})"
    if is_t5(config):
        if getattr(config, "model_type", "") != "t5":
            raise BackboneError(expected("a T5 as the encoder-decoder text backbone beside --image-model", got))
        return int(config.num_layers)
    if config is None or not hasattr(config, "num_hidden_layers") or not hasattr(config, "hidden_size") or \
            vision_config(config) is not None:
        raise BackboneError(expected("a text backbone (BERT, MiniLM, MPNet, ...) as MODEL with --image-model", got))
    return int(config.num_hidden_layers)


def image_model_config(model: str) -> Any:
    """The image model's transformers config (None for a named CNN); not an image model: one line."""
    if is_cnn_name(model):
        return None
    config = load_model_config(model)
    if vision_config(config) is None:
        raise BackboneError(expected("--image-model an image model: efficientnet-lite0..4, or a transformers vision "
                                     "model folder (ViT, DeiT, BEiT, DINOv2, CLIP/SigLIP) with its image processor",
                                     f"'{model}' ({type(config).__name__})"))
    return config


def store_images(manifest: dict[str, Any]) -> dict[str, QuestionImages]:
    """A store's distinct images per split, listed again from its recorded options (stage 2's --online);
    refused when their content changed since extraction."""
    names = {f.name for f in dataclasses.fields(ExtractConfig)}
    cfg = ExtractConfig(**{k: v for k, v in manifest["extract_config"].items() if k in names})
    data = question_images(cfg.dataset, cfg.image_column, cfg.splits, cfg.quoting, cfg.header)
    stored = manifest["dataset"]["image_fingerprint"]
    if data.fingerprint != stored:
        raise StoreError(f"The images of '{cfg.dataset}' changed since the store was written (content fingerprint "
                         f"{data.fingerprint}, store {stored}); --online needs the same images.")
    return data.splits


class VisionLanguageExtractKind(ExtractKind):
    name = "vision_language"
    precedence = 30  # --image-model decides, whatever the dataset (an image column) or text backbone look like
    free_text_targets = True  # --task generate with a T5 text backbone (answers and captions as free text)

    def matches(self, cfg: ExtractConfig, config: Any) -> bool:
        return cfg.image_model is not None

    def plan(self, cfg: ExtractConfig, config: Any, backbone: VisionLanguageBackbone | None) -> KindPlan:
        n_blocks = check_text_backbone(cfg, config)
        if cfg.task == "regression":
            raise DatasetError(expected("--task classification (or auto) for a vision-language store: answers "
                                        "are classes", "regression"))
        if cfg.task == "generate" and not is_t5(config):
            raise DatasetError(expected("--task generate with a T5 text backbone (it generates the answer; an "
                                        "encoder-only text backbone classifies)", f"'{cfg.model}'",
                                        "Drop --task generate, or use a T5."))
        image_config = None if backbone is not None else image_model_config(cfg.image_model)
        if is_cnn_name(cfg.image_model) and cfg.precision == "int8":
            raise BackboneError(expected(f"--precision fp32, bf16 or fp16 with the CNN '{cfg.image_model}'", "int8"))
        data = question_images(cfg.dataset, cfg.image_column, cfg.splits, cfg.quoting, cfg.header)
        task = "generate" if cfg.task == "generate" else "classification"
        text_cfg = dataclasses.replace(cfg, label_column=data.answer_column(cfg.label_column), task=task)
        if is_t5(config):
            plan = t5_plan(text_cfg, config, backbone.text if backbone is not None else None)
        else:
            tokenizer = backbone.tokenizer if backbone is not None else load_tokenizer(cfg.model)
            plan = text_plan(text_cfg, tokenizer, config, check_layers(cfg.layers, n_blocks),
                             int(config.hidden_size), n_blocks)
        if backbone is not None:
            image_config, (image_name, image_revision) = backbone.image.config, (backbone.image.name,
                                                                                 backbone.image.revision)
        else:
            image_name, image_revision = image_identity(cfg.image_model)
        asked = None if image_config is None else [int(vision_config(image_config).num_hidden_layers)]
        model = image_model_plan(cfg.image_model, asked, image_config, backbone.image if backbone else None)
        self._add_images(plan, data, model)
        image = {**model.image, "converted_to_rgb": {n: sum(m.values()) for n, m in data.modes.items()}}
        plan.request.update(image_model=image_name, image_revision=image_revision,
                            image_fingerprint=data.fingerprint, image_column=data.image_column,
                            image_layers=model.stages, image={k: image[k] for k in ("family", "image_size", "tokens")})
        plan.manifest.update(
            image_backbone={"name": image_name, "revision": image_revision, **model.backbone}, image=image,
            vision_language={"image_column": data.image_column, "image_part": IMAGES, "image_index": IMAGE_INDEX,
                             "images_per_row": len(data.image_column.split(",")),
                             "text_backbone": "t5" if is_t5(config) else "encoder", "image_layers": model.stages,
                             "images": {n: len(s.items) for n, s in data.splits.items()},
                             "questions": {n: s.n_rows for n, s in data.splits.items()}})
        plan.manifest["dataset"] = {**plan.manifest["dataset"], "image_fingerprint": data.fingerprint,
                                    "image_column": data.image_column}
        plan.state = {"text": plan.state, "images": data.splits, "image_stages": model.stages,
                      "image_revision": image_revision, "t5": is_t5(config)}
        return plan

    @staticmethod
    def _add_images(plan: KindPlan, data: VisionLanguageData, model) -> None:
        """Each split's images part and the text part's image_index column (row counts checked against the text)."""
        for name, parts in plan.parts.items():
            images = data.splits[name]
            if images.n_rows != parts[ROOT].n_rows:  # both read the same file: only a bug could get here
                raise DatasetError(expected(f"one image per text row in split '{name}'",
                                            f"{images.n_rows} images for {parts[ROOT].n_rows} rows"))
            parts[ROOT].columns[IMAGE_INDEX] = images.image_index
            n, t = len(images.items), model.tokens
            offsets = np.arange(n + 1, dtype=np.int64) * t
            parts[IMAGES] = PartPlan(offsets, model.layers, model.width, {
                "offsets": offsets, "input_ids": np.tile(np.arange(t, dtype=np.int32), n),
                "token_type_ids": np.zeros(n * t, dtype=np.int8)})
            plan.split_facts[name].update(images=n, converted_to_rgb=sum(data.modes[name].values()),
                                          modes_converted=data.modes[name])

    def load_backbone(self, cfg: ExtractConfig, device: str) -> VisionLanguageBackbone:
        load_text = load_seq2seq_backbone if is_t5(load_model_config(cfg.model)) else load_backbone
        return VisionLanguageBackbone(load_text(cfg.model, cfg.precision, device),
                                      load_image_backbone(cfg.image_model, cfg.precision, device))

    def rows(self, plan: KindPlan, backbone: VisionLanguageBackbone, split: str, part: str) -> RowsFn:
        self._check_image_weights(plan, backbone)
        if part != IMAGES and plan.state["t5"]:  # the encoder part or the decoder part
            return t5_rows(plan.state["text"], plan.parts[split], backbone.text, split, part)
        if part == ROOT:
            return text_rows(plan.state["text"][split], plan.parts[split][ROOT].layers, backbone.text)
        if part != IMAGES:
            raise StoreError(expected(f"a part '' or '{IMAGES}' of a vision-language store", repr(part)))
        stages = plan.state["image_stages"]
        prefetch = PixelPrefetcher(plan.state["images"][split], backbone.image, decode_threads())

        def compute(items: list[int]) -> list[torch.Tensor]:
            return list(backbone.image.hidden_states(prefetch.get(list(items)), stages).cpu())  # (T, 1, d) each

        return compute

    def fidelity(self, cfg: ExtractConfig, plan: KindPlan, backbone: VisionLanguageBackbone) -> dict[str, Any] | None:
        """The text part's fidelity as the encoder kind measures it, and the image tokens' under `image`."""
        self._check_image_weights(plan, backbone)
        first = next(iter(plan.parts))
        if plan.state["t5"]:
            text = t5_fidelity(cfg, plan.state["text"], plan.parts[first], plan.store_dtype, backbone.text)
        else:
            text = text_fidelity(cfg, plan.state["text"], plan.parts[first][ROOT].layers, plan.store_dtype,
                                 backbone.text)
        name, images = next(iter(plan.state["images"].items()))
        image = image_fidelity(cfg.image_model, images, plan.state["image_stages"], backbone.image, cfg.error_sample)
        if text is None and image is None:
            return None
        return {**(text or {}), **({"image": {**image, "split": name}} if image else {})}

    def frozen_weights(self, backbone: VisionLanguageBackbone) -> dict[str, np.ndarray]:
        """A T5 text backbone's LM head and relative biases (stage 2 runs without the backbone); none else."""
        return t5_frozen_weights(backbone.text) if is_t5(backbone.config) else {}

    def finish_manifest(self, manifest: dict[str, Any]) -> None:
        if "seq2seq" in manifest:
            finish_t5_manifest(manifest)

    @staticmethod
    def _check_image_weights(plan: KindPlan, backbone: VisionLanguageBackbone) -> None:
        if backbone.image.revision != plan.state["image_revision"]:
            raise BackboneError(expected(f"the image model's weights hashed at planning ({plan.state['image_revision']})",
                                         backbone.image.revision, "Its files changed during the extraction."))

