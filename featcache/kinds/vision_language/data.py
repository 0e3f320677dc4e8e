"""Vision-language datasets: text rows (a question, an answer) that each name an image.

`question_images` reads the image column of every split of a text dataset (the same files and rows the
text kinds read: featcache/text/sources.py), resolves each cell to a file (a path, absolute or relative to the
data file) or to the image's bytes (a datasets Image feature), and dedupes: per split, the distinct images
in order of first use (by resolved path, or by content for bytes) and each row's `image_index` into them.
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

    image_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (n_rows,) int64
    first_rows: list[int] = field(default_factory=list)  # the first row that uses each distinct image

    def describe(self, i: int) -> str:  # errors name the row a user can find in the file
        return f"split '{self.name}', row {self.first_rows[i]} ({self.where[i]})"

    @property
    def n_rows(self) -> int:
        return len(self.image_index)


@dataclass
class VisionLanguageData:
    splits: dict[str, QuestionImages]
    image_column: str
    fingerprint: str  # content of every split's distinct images, in order (images.scan)
    modes: dict[str, dict[str, int]]  # per split: image modes converted to RGB, and how many
    columns: list[str]  # every column of the dataset (any split), to pick the answer column from

    def answer_column(self, asked: str | None) -> str | None:
        """--label-column, else the first answer column (None: the text kinds' own label default)."""
        return asked if asked is not None else next((c for c in ANSWER_COLUMNS if c in self.columns), None)


def _empty(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def split_images(name: str, cells: list, source: str, column: str) -> QuestionImages:
    """The distinct images that the cells of one split's image column name, with each row's index."""
    base = Path(source).parent if Path(source).is_file() else Path(source)
    found: dict[str, int] = {}  # dedupe key (resolved path, or sha256 of the bytes) -> distinct index
    items: list[Path | bytes] = []
    where: list[str] = []
    first_rows: list[int] = []
    index = np.empty(len(cells), dtype=np.int64)
    for row, value in enumerate(cells):
        data = None
        if isinstance(value, dict):  # a datasets Image feature: {'bytes': ..., 'path': ...}
            data = bytes(value["bytes"]) if value.get("bytes") else None
            value = value.get("path") if data is None else value
        if data is not None:
            key = "sha256:" + hashlib.sha256(data).hexdigest()
        else:
            if _empty(value):
                raise DatasetError(expected(f"an image path in split '{name}', row {row} (column '{column}')",
                                            "an empty value", f"Fix {source}."))
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
        index[row] = found[key]
    return QuestionImages(name, items, None, source, where, image_index=index, first_rows=first_rows)


def question_images(dataset: str, image_column: str | None, splits: list[str] | None = None,
                    quoting: str = "auto", header: bool = True) -> VisionLanguageData:
    """Every split's distinct images and each row's image; every file is read once here (the content
    fingerprint, and a missing or undecodable image named by split, row and path before any weights load)."""
    data = load_dataset_path(dataset, Quoting(quoting), header)
    if splits:
        missing = [s for s in splits if s not in data.splits]
        if missing:
            raise DatasetError(expected(f"split(s) {missing} in the dataset", f"splits {sorted(data.splits)}"))
        data.splits = {s: data.splits[s] for s in splits}
    first = next(iter(data.splits.values())).frame
    column = image_column or next((c for c in IMAGE_COLUMNS if c in first.columns), None)
    if column is None:
        raise DatasetError(expected(f"an image column ({', '.join(IMAGE_COLUMNS)}) in a vision-language dataset",
                                    f"columns {list(first.columns)}", "Name it with --image-column."))
    found = {}
    for name, table in data.splits.items():
        if column not in table.frame.columns:
            flag = " (--image-column)" if image_column else ""
            raise DatasetError(expected(f"column '{column}'{flag} in split '{name}'",
                                        f"columns {list(table.frame.columns)}"))
        found[name] = split_images(name, table.frame[column].tolist(), table.source, column)
    fingerprint, modes = scan(found)
    columns = list(dict.fromkeys(c for t in data.splits.values() for c in t.frame.columns))
    return VisionLanguageData(found, column, fingerprint, modes, columns)

