"""A real image classification store that ships offline: scikit-learn's handwritten digits (1,797 8x8 images,
10 classes), upscaled to 64x64 grey PNGs in an image folder, extracted with the bundled EfficientNet-Lite0.

    python benchmarks/digits_store.py --work /tmp/digits     # -> /tmp/digits/store.zarr
    python benchmarks/bench_levers.py --stores digits=/tmp/digits/store.zarr --levers "lst=;last=--top last" ...

Splits are stratified and seeded: train 1,000, dev 300, test 497 images. Unlike easy-VQA's shapes (every method
scores 1.0 there), the probe leaves room on these: they are far from the photos the backbone was trained on.
Needs scikit-learn (the `bench` extra: `make bench` installs it with --no-deps).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, setup_logging

from featcache import ExtractConfig, extract

SPLITS = {"train": 1000, "dev": 300}  # the test split takes the rest (497)
SIDE = 64  # pixels: the 8x8 digits upscaled (the image processor then resizes to its own 224)


def digits_folder(root: Path, seed: int = 0) -> Path:
    """ROOT/{train,dev,test}/<digit>/<i>.png, stratified by digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    # stratify: deal each digit's shuffled images out in turn, so every split has every digit in proportion
    order = order[np.argsort(digits.target[order], kind="stable")]
    ranks = np.zeros(len(order), dtype=np.int64)
    for d in range(10):
        mine = order[digits.target[order] == d]
        ranks[mine] = np.arange(len(mine))
    order = order[np.lexsort((digits.target[order], ranks[order]))]
    bounds = np.cumsum([0, *SPLITS.values(), len(order)])
    for name, lo, hi in zip([*SPLITS, "test"], bounds[:-1], bounds[1:]):
        for i in order[lo:hi]:
            folder = root / name / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)  # 0..16 grey levels -> 0..255
            Image.fromarray(pixels, mode="L").resize((SIDE, SIDE), Image.BICUBIC).save(folder / f"{i}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for the images and the store")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split")
    args = parser.parse_args()
    setup_logging()
    work = Path(args.work)
    data = digits_folder(work / "data", args.seed)
    manifest = extract(ExtractConfig(model="efficientnet-lite0", dataset=str(data), out=str(work / "store.zarr"),
                                     store_dtype="fp16", device="cpu", overwrite=True))
    log.info("store %s: %s", work / "store.zarr", {n: s["examples"] for n, s in manifest["splits"].items()})


if __name__ == "__main__":
    main()
