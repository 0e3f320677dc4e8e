"""Reading a labelled text dataset from disk into one pandas DataFrame per split.

Accepted: a csv/tsv/json/jsonl/parquet file (one split, named by `single_split`), a directory
holding one such file per split (train.tsv, dev.tsv, ...), or a `datasets.save_to_disk` folder.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import pandas as pd

from ..errors import DatasetError, expected

log = logging.getLogger(__name__)

SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".parquet")
TEXT_COLUMNS = ("text", "sentence", "sentence1", "question", "question1", "premise", "#1 String")
PAIR_OF = {"sentence1": "sentence2", "question": "sentence", "question1": "question2",
           "premise": "hypothesis", "#1 String": "#2 String"}
LABEL_COLUMNS = ("label", "labels", "score", "Quality", "target")


class Quoting(str, Enum):
    """How delimited text files treat quote characters (real files disagree)."""

    auto = "auto"  # no quote handling if every row then has the header's field count, else csv
    csv = "csv"    # standard CSV quoting: quoted fields may hold delimiters and newlines
    none = "none"  # quotes are plain characters (GLUE's TSVs need this)

MAX_LINES_SHOWN, MAX_LINES_KEPT = 5, 100  # rejected rows named in the log / kept in the manifest


@dataclass
class SplitTable:
    """One split as read from disk, plus what was rejected on the way."""

    frame: pd.DataFrame
    source: str
    rejected_rows: int = 0
    quoting: str = ""
    rejected_lines: list[int] = field(default_factory=list)  # 1-based line numbers (first few) of rejected rows


@dataclass
class LoadedDataset:
    splits: dict[str, SplitTable]
    source: str
    fingerprint: str = ""


def _read_delimited(path: Path, quoting: Quoting, header: bool) -> SplitTable:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(
            expected("a UTF-8 text file", f"undecodable bytes at offset {err.start} of {path}",
                     "Re-encode it, e.g. iconv -f latin1 -t utf-8.")
        ) from None

    def parse(mode: Quoting) -> tuple[list[str], list[list[str]], list[int]]:
        """(column names, good rows, line numbers of the rows rejected for their field count)."""
        q = csv.QUOTE_NONE if mode is Quoting.none else csv.QUOTE_MINIMAL
        reader = csv.reader(text.splitlines(keepends=True) if mode is Quoting.none else _lines(text),
                            delimiter=delimiter, quoting=q)
        rows = [(reader.line_num, r) for r in reader if r]  # line_num: where the row ends (quoted newlines)
        if not rows:
            return [], [], []
        names = rows[0][1] if header else [str(i) for i in range(len(rows[0][1]))]
        body = rows[1:] if header else rows
        return names, [r for _, r in body if len(r) == len(names)], [n for n, r in body if len(r) != len(names)]

    mode = quoting
    if quoting is Quoting.auto:
        names, rows, bad = parse(Quoting.none)
        mode = Quoting.none
        if bad:
            names, rows, bad = parse(Quoting.csv)
            mode = Quoting.csv
    else:
        names, rows, bad = parse(quoting)
    if not names:
        raise DatasetError(expected("a header row and at least one row of data", f"an empty file {path}"))
    frame = pd.DataFrame(rows, columns=names)
    if bad:
        shown = ", ".join(map(str, bad[:MAX_LINES_SHOWN])) + (", ..." if len(bad) > MAX_LINES_SHOWN else "")
        log.warning("%s: rejected %d rows with the wrong number of fields (quoting=%s), at lines %s",
                    path, len(bad), mode.value, shown)
    return SplitTable(frame, str(path), len(bad), mode.value, bad[:MAX_LINES_KEPT])


def _lines(text: str):
    # csv with quoting wants the raw stream so quoted newlines survive
    import io

    return io.StringIO(text, newline="")


def _read_file(path: Path, quoting: Quoting, header: bool) -> SplitTable:
    table = _read_any(path, quoting, header)
    if len(table.frame.columns) == 0:
        raise DatasetError(expected("a header row and at least one row of data", f"an empty file {path}"))
    return table


def _read_any(path: Path, quoting: Quoting, header: bool) -> SplitTable:
    suffix = path.suffix.lower()
    try:
        if suffix in (".tsv", ".csv"):
            return _read_delimited(path, quoting, header)
        if suffix == ".jsonl":
            return SplitTable(pd.read_json(path, lines=True, dtype=False), str(path))
        if suffix == ".json":
            try:
                return SplitTable(pd.read_json(path, dtype=False), str(path))
            except ValueError:
                return SplitTable(pd.read_json(path, lines=True, dtype=False), str(path))
        if suffix == ".parquet":
            return SplitTable(pd.read_parquet(path), str(path))
    except UnicodeDecodeError:
        raise DatasetError(expected("a UTF-8 text file", f"undecodable bytes in {path}")) from None
    except ValueError as err:
        raise DatasetError(f"Could not parse {path}: {err}") from None
    raise DatasetError(expected(f"a file ending in one of {', '.join(SUFFIXES)}", path.name))


def load_dataset_path(path: str | Path, quoting: Quoting = Quoting.auto, header: bool = True,
                      single_split: str = "train") -> LoadedDataset:
    """Read every split found at `path`. Raises DatasetError with a one-line reason."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(expected("an existing dataset file or directory", f"'{path}' (no such path)"))
    if path.is_file():
        splits = {single_split: _read_file(path, quoting, header)}
    elif (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
        splits = _read_saved(path)
    else:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
        if not files:
            raise DatasetError(expected(f"a directory with one {'/'.join(SUFFIXES)} file per split",
                                        f"no such file in '{path}'"))
        splits = {p.stem: _read_file(p, quoting, header) for p in files}
    data = LoadedDataset(splits, str(path.resolve()))
    data.fingerprint = fingerprint(data)
    return data


def _read_saved(path: Path) -> dict[str, SplitTable]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.Dataset):
        return {"train": SplitTable(loaded.to_pandas(), str(path))}
    return {name: SplitTable(ds.to_pandas(), f"{path}/{name}") for name, ds in loaded.items()}


def fingerprint(data: LoadedDataset) -> str:
    """A content hash of every split (names, columns and values), stable across machines."""
    h = hashlib.sha256()
    for name in sorted(data.splits):
        frame = data.splits[name].frame
        h.update(name.encode())
        h.update("\x1f".join(map(str, frame.columns)).encode())
        h.update(pd.util.hash_pandas_object(frame.astype(str), index=False).values.tobytes())
    return h.hexdigest()[:16]


@dataclass
class Columns:
    text: str
    pair: str | None
    label: str | None


def resolve_columns(data: LoadedDataset, text: str | None, pair: str | None, label: str | None) -> Columns:
    """Pick text/pair/label columns: given ones are checked, missing ones inferred from common names."""
    first = next(iter(data.splits.values())).frame
    names = list(first.columns)

    def check(col: str, flag: str) -> str:
        for split, table in data.splits.items():
            if col not in table.frame.columns:
                raise DatasetError(expected(f"column '{col}' ({flag}) in split '{split}'",
                                            f"columns {list(table.frame.columns)}"))
        return col

    if text is None:
        text = next((c for c in TEXT_COLUMNS if c in names), None)
        if text is None:
            raise DatasetError(expected("a text column", f"columns {names}", "Name it with --text-column."))
    check(text, "--text-column")
    if pair is None and text in PAIR_OF and PAIR_OF[text] in names:
        pair = PAIR_OF[text]
    if pair is not None:
        check(pair, "--text-pair-column")
    if label is None:  # any split counts: a label column missing from one split is an error later, not a guess
        label = next((c for c in LABEL_COLUMNS if any(c in t.frame.columns for t in data.splits.values())), None)
    elif label not in names:
        check(label, "--label-column")
    return Columns(text, pair, label)
