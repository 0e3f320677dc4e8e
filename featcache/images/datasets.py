"""Image datasets, shared by the kinds of store with an image part (image, vision_language), all decoded by
Pillow (`load_image_splits`):
    DATA/<split>/<class>/*.png|jpg|...      a folder per split (train, dev, validation, test), a folder per class
    DATA/<split>/*.png                        a split without labels
    a csv/tsv/jsonl/parquet per split         an image path column (relative to the file) and a label column
    a datasets.save_to_disk folder            an Image feature (bytes or paths) and a label column
`scan` reads every image once (the content fingerprint, and a bad file named before any weights load).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DatasetError, expected

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "image_path", "img", "path", "file", "filename", "file_name")
LABEL_COLUMNS = ("label", "labels", "class", "target")

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
    from ..text.sources import SUFFIXES

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
    from ..text.sources import Quoting, load_dataset_path

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


def describe_modes(modes: dict[str, dict[str, int]]) -> str:
    return json.dumps({s: m for s, m in modes.items() if m})
