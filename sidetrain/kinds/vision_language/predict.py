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
    image = (manifest.get("vision_language") or {}).get("image_column", "image")
    questions, images = [], []
    for path in paths:
        if not Path(path).is_file():
            raise LstError(expected("a rows file (csv/tsv/jsonl/parquet) of questions and image paths",
                                    f"'{path}' (no such file)"))
        frame = next(iter(load_dataset_path(path).splits.values())).frame
        missing = [c for c in (text, pair, image) if c and c not in frame.columns]
        if missing:
            raise LstError(expected(f"columns {missing} in '{path}' (the store's question and image columns)",
                                    f"columns {list(frame.columns)}"))
        firsts = frame[text].astype(str).tolist()
        seconds = frame[pair].astype(str).tolist() if pair else None
        questions += [f"{a}\t{b}" for a, b in zip(firsts, seconds)] if seconds else firsts
        base = Path(path).resolve().parent
        images += [str(p if Path(p).is_absolute() else base / p) for p in frame[image].astype(str)]
    return questions, images


def pair_up(texts: list[str], images: list[str]) -> list[str]:
    """--text Q (repeatable) with --image PATH: one image for every question, or one per question."""
    if texts and not images:
        raise LstError(expected("--image PATH with --text for a run on a vision-language store", "no --image",
                                "Give the image each question is about (one for all, or one per --text)."))
    if images and not texts:
        raise LstError(expected("--text QUESTION with --image", "no --text"))
    if len(images) not in (1, len(texts)):
        raise LstError(expected(f"one --image, or one per --text ({len(texts)})", f"{len(images)} images"))
    return [f"{images[0] if len(images) == 1 else p}\t{t}" for t, p in zip(texts, images * len(texts))]


def predict_questions(run: Path, config: dict[str, Any], questions: list[str], images: list[str],
                      device: str = "auto", batch_size: int = 32) -> list[str]:
    """An answer per question, from both backbones live and the run's side network, in one
    `VisionLanguageLadderModel` (pretrained.py: the one implementation, shared with the Python API)."""
    model = VisionLanguageLadderModel(Path(run), config, resolve_device(device)).eval()
    return model.predict(list(zip(images, questions)), batch_size)
