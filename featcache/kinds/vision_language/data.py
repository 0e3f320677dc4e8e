"""Vision-language datasets: text rows (a question, an answer) that each name an image.

`question_images` reads the image column (or columns: `--image-column left,right`) of every split of a text dataset (the same files and rows the
text kinds read: featcache/text/sources.py), resolves each cell to a file (a path, absolute or relative to the
data file) or to the image's bytes (a datasets Image feature), and dedupes: per split, the distinct images
in order of first use (by resolved path, or by content for bytes) and each row's `image_index` into them
((n_rows, k) for k image columns).
The distinct images of a split are an `ImageSplit`, so the image kind's code decodes, scans and
preprocesses them (featcache/images/). Stage 2's `--online` lists the images again with the same
function, from the store's recorded `extract_config`, and compares `fingerprint` with the manifest's
`dataset.image_fingerprint`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import DatasetError, expected
from ...images.datasets import IMAGE_COLUMNS, ImageSplit, scan
from ...text.sources import Quoting, load_dataset_path

ANSWER_COLUMNS = ("answer", "answers")  # tried before the text kinds' label names (label, score, ...)


@dataclass
class QuestionImages(ImageSplit):
    """The distinct images of one split, and for each text row the index of its image among them."""

    # (n_rows,) int64, or (n_rows, k) for k image columns (a row's images in column order)
    image_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    first_rows: list[int] = field(default_factory=list)  # the first row that uses each distinct image

    def describe(self, i: int) -> str:  # errors name the row a user can find in the file
        return f"split '{self.name}', row {self.first_rows[i]} ({self.where[i]})"

    @property
    def n_rows(self) -> int:
        return len(self.image_index)


@dataclass
class VisionLanguageData:
    splits: dict[str, QuestionImages]
    image_column: str  # the image column, or several comma-separated ("left,right")
    fingerprint: str  # content of every split's distinct images, in order (images.scan)
    modes: dict[str, dict[str, int]]  # per split: image modes converted to RGB, and how many
    columns: list[str]  # every column of the dataset (any split), to pick the answer column from

    def answer_column(self, asked: str | None) -> str | None:
        """--label-column, else the first answer column (None: the text kinds' own label default)."""
        return asked if asked is not None else next((c for c in ANSWER_COLUMNS if c in self.columns), None)


def _empty(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def split_images(name: str, columns: dict[str, list], source: str) -> QuestionImages:
    """The distinct images that the cells of one split's image columns name (deduped over all of them), with
    each row's index: (n_rows,) for one column, (n_rows, k) for k columns, in column order."""
    base = Path(source).parent if Path(source).is_file() else Path(source)
    found: dict[str, int] = {}  # dedupe key (resolved path, or sha256 of the bytes) -> distinct index
    items: list[Path | bytes] = []
    where: list[str] = []
    first_rows: list[int] = []
    n_rows = len(next(iter(columns.values())))
    index = np.empty((n_rows, len(columns)), dtype=np.int64)
    for row in range(n_rows):
        for k, (column, cells) in enumerate(columns.items()):
            index[row, k] = _distinct(cells[row], name, row, column, source, base, found, items, where, first_rows)
    return QuestionImages(name, items, None, source, where, image_index=index[:, 0] if len(columns) == 1 else index,
                          first_rows=first_rows)


def _distinct(value: object, name: str, row: int, column: str, source: str, base: Path, found: dict[str, int],
              items: list, where: list[str], first_rows: list[int]) -> int:
    """The distinct index of one cell's image, adding it to `items` when first seen."""
    data = None
    if isinstance(value, dict):  # a datasets Image feature: {'bytes': ..., 'path': ...}
        data = bytes(value["bytes"]) if value.get("bytes") else None
        value = value.get("path") if data is None else value
    if data is not None:
        key = "sha256:" + hashlib.sha256(data).hexdigest()
    else:
        if _empty(value):
            raise DatasetError(expected(f"an image path in split '{name}', row {row} (column '{column}')",
                                        "an empty value", f"Fix {source}: every row names one image per image "
                                                          "column."))
        path = Path(str(value)).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        key = str(path)
    if key not in found:
        if data is None and not path.is_file():
            raise DatasetError(expected(f"an image file for split '{name}', row {row} (column '{column}')",
                                        f"'{path}': no such file", f"Fix {source} or add the file."))
        found[key] = len(items)
        items.append(data if data is not None else path)
        where.append(f"{source} row {row}" if data is not None else str(path))
        first_rows.append(row)
    return found[key]


def image_columns(asked: str | None, columns: list[str]) -> list[str]:
    """--image-column: one column, or several comma-separated (a row's images, in order: 'left,right');
    default: the first usual image column name present."""
    if asked:
        names = [c.strip() for c in asked.split(",")]
        if any(not c for c in names) or len(set(names)) != len(names):
            raise DatasetError(expected("--image-column: one column, or distinct columns separated by commas",
                                        repr(asked)))
        return names
    column = next((c for c in IMAGE_COLUMNS if c in columns), None)
    if column is None:
        raise DatasetError(expected(f"an image column ({', '.join(IMAGE_COLUMNS)}) in a vision-language dataset",
                                    f"columns {columns}", "Name it with --image-column (several: 'left,right')."))
    return [column]


def question_images(dataset: str, image_column: str | None, splits: list[str] | None = None,
                    quoting: str = "auto", header: bool = True) -> VisionLanguageData:
    """Every split's distinct images and each row's image(s); every file is read once here (the content
    fingerprint, and a missing or undecodable image named by split, row and path before any weights load)."""
    data = load_dataset_path(dataset, Quoting(quoting), header)
    if splits:
        missing = [s for s in splits if s not in data.splits]
        if missing:
            raise DatasetError(expected(f"split(s) {missing} in the dataset", f"splits {sorted(data.splits)}"))
        data.splits = {s: data.splits[s] for s in splits}
    first = next(iter(data.splits.values())).frame
    names = image_columns(image_column, list(first.columns))
    found = {}
    for name, table in data.splits.items():
        absent = [c for c in names if c not in table.frame.columns]
        if absent:
            flag = " (--image-column)" if image_column else ""
            raise DatasetError(expected(f"column(s) {absent}{flag} in split '{name}'",
                                        f"columns {list(table.frame.columns)}"))
        found[name] = split_images(name, {c: table.frame[c].tolist() for c in names}, table.source)
    fingerprint, modes = scan(found)
    columns = list(dict.fromkeys(c for t in data.splits.values() for c in t.frame.columns))
    return VisionLanguageData(found, ",".join(names), fingerprint, modes, columns)
