"""`lst predict RUN --text QUESTION --image PATH` (or rows files of questions and image paths): an answer per
question, from both backbones live and the run's side network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featcache.errors import LstError, expected
from featcache.loading import resolve_device

from .pretrained import VisionLanguageLadderModel


def question_rows(paths: list[str], manifest: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Questions and image paths from rows files (csv/tsv/jsonl/parquet with the store's text and image
    columns; a relative image path is relative to its file)."""
    from featcache.text.sources import load_dataset_path

    columns = (manifest.get("dataset") or {}).get("columns") or {}  # the store's question (and pair) columns
    text, pair = columns.get("text", "question"), columns.get("pair")
    image_columns = (manifest.get("vision_language") or {}).get("image_column", "image").split(",")
    questions, images = [], []
    for path in paths:
        if not Path(path).is_file():
            raise LstError(expected("a rows file (csv/tsv/jsonl/parquet) of questions and image paths",
                                    f"'{path}' (no such file)"))
        frame = next(iter(load_dataset_path(path).splits.values())).frame
        missing = [c for c in (text, pair, *image_columns) if c and c not in frame.columns]
        if missing:
            raise LstError(expected(f"columns {missing} in '{path}' (the store's question and image columns)",
                                    f"columns {list(frame.columns)}"))
        firsts = frame[text].astype(str).tolist()
        seconds = frame[pair].astype(str).tolist() if pair else None
        questions += [f"{a}\t{b}" for a, b in zip(firsts, seconds)] if seconds else firsts
        base = Path(path).resolve().parent
        cells = zip(*(frame[c].astype(str) for c in image_columns))  # a row's images, in column order
        images += ["\t".join(str(p if Path(p).is_absolute() else base / p) for p in row) for row in cells]
    return questions, images


def pair_up(texts: list[str], images: list[str], per_row: int = 1) -> list[str]:
    """--text Q (repeatable) with --image PATH: one image for every question, or one per question; for runs
    with k images per row, k --image for every question, or k per question (in order)."""
    if texts and not images:
        raise LstError(expected("--image PATH with --text for a run on a vision-language store", "no --image",
                                "Give the image each question is about (one for all, or one per --text)."))
    if images and not texts:
        raise LstError(expected("--text QUESTION with --image", "no --text"))
    k = per_row
    if len(images) not in (k, k * len(texts)):
        what = "one --image, or one per --text" if k == 1 else f"{k} --image (the row's images), or {k} per --text"
        raise LstError(expected(f"{what} ({len(texts)} --text)", f"{len(images)} images"))
    groups = ["\t".join(images[i:i + k]) for i in range(0, len(images), k)]
    return [f"{groups[0] if len(groups) == 1 else g}\t{t}" for t, g in zip(texts, groups * len(texts))]


def predict_questions(run: Path, config: dict[str, Any], questions: list[str], images: list[str],
                      device: str = "auto", batch_size: int = 32) -> list[str]:
    """An answer per question, from both backbones live and the run's side network, in one
    `VisionLanguageLadderModel` (pretrained.py: the one implementation, shared with the Python API)."""
    model = VisionLanguageLadderModel(Path(run), config, resolve_device(device)).eval()
    return model.predict(list(zip(images, questions)), batch_size)
