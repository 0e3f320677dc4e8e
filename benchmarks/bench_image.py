"""Image stores (#12), measured side by side in one run on easy-VQA's real PNGs labelled by shape.

1. Extraction: `extract()` (decode in worker threads, preprocess, forward, encode, write) against a bare forward
   of the same preprocessed batches (pixels ready in RAM, no writes). Goal: >= 0.9 of its images/s.
   The bundled EfficientNet-Lite0 (224 px, 9 layers pooled to 7x7) and a ViT-S/16-sized random ViT
   (224 px, 197 tokens, d=384, 12 blocks; timing only: no pretrained ViT ships offline).
2. Bytes per token per layer on disk of the fp16 stores (goal: within 2% of 2 * d).
3. Image LST, one epoch from the store against one epoch with the backbone live on the images (--online).
4. LST against the linear probe (`--head probe`) on the EfficientNet-Lite0 store: easy-VQA's images labelled
   by the shape they show (circle / rectangle / triangle); train from easy-VQA's train set, dev and test from
   its test set (disjoint images).

Sizes: LST_BENCH_IMAGES_PER_CLASS (train, default 100; dev and test take 30 and 50), LST_BENCH_VIT_IMAGES (48),
LST_BENCH_EPOCHS (10), LST_BENCH_SEEDS (2). Results: benchmarks/results/image.json and image.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, setup_logging, timed, write_results

from featcache import ExtractConfig, extract
from featcache.images.backbones import load_image_backbone
from featcache.images.datasets import decode_rgb, load_image_splits
from sidetrain import TrainConfig, train

PER_CLASS = int(os.environ.get("LST_BENCH_IMAGES_PER_CLASS", "100"))
VIT_IMAGES = int(os.environ.get("LST_BENCH_VIT_IMAGES", "48"))
EPOCHS = int(os.environ.get("LST_BENCH_EPOCHS", "10"))
SEEDS = int(os.environ.get("LST_BENCH_SEEDS", "2"))
SHAPES = ("circle", "rectangle", "triangle")
BATCH = 32


def shapes_dataset(root: Path) -> Path:
    """DATA/{train,dev,test}/<shape>/<id>.png from easy-VQA (train: its train set; dev, test: its test set)."""
    import easy_vqa

    base = Path(easy_vqa.__file__).parent / "data"

    def labels(split: str) -> dict[int, str]:
        return {i: a for _, a, i in json.loads((base / split / "questions.json").read_text()) if a in SHAPES}

    plan = {"train": ("train", 0, PER_CLASS), "dev": ("test", 0, 30), "test": ("test", 30, 80)}
    for split, (src, lo, hi) in plan.items():
        found = labels(src)
        for shape in SHAPES:
            (root / split / shape).mkdir(parents=True, exist_ok=True)
            for i in sorted(k for k, v in found.items() if v == shape)[lo:hi]:
                shutil.copy(base / src / "images" / f"{i}.png", root / split / shape / f"{i}.png")
    return root


def vit_small(root: Path) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                       intermediate_size=1536)
    ViTModel(config, add_pooling_layer=False).save_pretrained(root)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(root)
    return root


def bare_forward_seconds(model: str, data: Path, splits: list[str], batch: int) -> tuple[float, int]:
    """The model's own forward over the same batches as extract(), pixels preprocessed beforehand."""
    backbone = load_image_backbone(model, "fp32", "cpu")
    found, _ = load_image_splits(str(data), None, None, splits)
    batches = []
    for name in splits:
        s = found[name]
        pixels = np.stack([backbone.pixels(decode_rgb(s, i)) for i in range(len(s.items))])
        batches += [torch.from_numpy(pixels[b:b + batch]) for b in range(0, len(pixels), batch)]
    n = sum(len(b) for b in batches)

    def run() -> None:
        with torch.no_grad():
            for b in batches:
                if backbone.family == "cnn":
                    backbone.model.extract_features(b)
                else:
                    backbone.model(pixel_values=b, output_hidden_states=True)

    return timed(run)[0], n


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "/hidden/" in str(p))


def extraction(model: str, data: Path, out: Path, splits: list[str] | None, batch: int,
               error_sample: int = 32) -> dict[str, Any]:
    cfg = ExtractConfig(model=model, dataset=str(data), out=str(out), store_dtype="fp16", batch_size=batch,
                        device="cpu", splits=splits, overwrite=True, error_sample=error_sample)
    names = splits or ["train", "dev", "test"]
    bare, n = bare_forward_seconds(model, data, names, batch)
    seconds, manifest = timed(lambda: extract(cfg))
    bare2, _ = bare_forward_seconds(model, data, names, batch)  # again after: machine noise hits both
    bare = min(bare, bare2)
    tokens = sum(manifest["splits"][s]["tokens"] for s in names)
    per_token_layer = disk_bytes(out) / tokens / len(manifest["layers"])
    return {"images": n, "error_sample": error_sample, "extract_seconds": round(seconds, 2), "bare_forward_seconds": round(bare, 2),
            "extract_images_per_s": round(n / seconds, 2), "bare_images_per_s": round(n / bare, 2),
            "ratio": round(bare / seconds, 3), "hidden_size": manifest["hidden_size"],
            "layers": len(manifest["layers"]), "tokens_per_image": manifest["image"]["tokens"],
            "bytes_per_token_per_layer": round(per_token_layer, 1),
            "fp16_overhead": round(per_token_layer / (2 * manifest["hidden_size"]) - 1, 4)}


def lst_vs_probe(store: Path, work: Path) -> dict[str, Any]:
    probe = train(TrainConfig(store=str(store), out=str(work / "probe"), head="probe", device="cpu"))
    runs = []
    for seed in range(SEEDS):
        s = train(TrainConfig(store=str(store), out=str(work / f"lst{seed}"), epochs=EPOCHS, batch_size=BATCH,
                              seed=seed, device="cpu", resume=False))
        runs.append({"seed": seed, "dev_best": s["best_eval"], "dev_last": s["history"][-1]["eval_accuracy"],
                     "test": s["splits"]["test"]["accuracy"], "train_seconds": round(s["train_seconds"], 1),
                     "trainable_parameters": s["trainable_parameters"]})
    return {"probe": {"dev": probe["best_eval"], "test": probe["splits"]["test"]["accuracy"]}, "lst": runs}


def cached_vs_online(store: Path, work: Path) -> dict[str, Any]:
    out = {}
    for online in (False, True):
        s = train(TrainConfig(store=str(store), out=str(work / f"epoch-online{online}"), epochs=1, batch_size=BATCH,
                              device="cpu", online=online, resume=False))
        out["online" if online else "cached"] = round(s["history"][0]["seconds"], 2)
    out["speedup"] = round(out["online"] / out["cached"], 2)
    return out


def main() -> None:
    setup_logging()
    work = Path(tempfile.mkdtemp(prefix="lst-bench-image-"))
    try:
        data = shapes_dataset(work / "data")
        log.info("extraction: efficientnet-lite0")
        cnn = extraction("efficientnet-lite0", data, work / "cnn.zarr", None, 64)
        log.info("extraction: ViT-S-sized random ViT")
        vit_data = shapes_dataset_subset(data, work / "vit_data", VIT_IMAGES)
        vit = extraction(str(vit_small(work / "vit")), vit_data, work / "vit.zarr", ["train"], 16)
        vit0 = extraction(str(work / "vit"), vit_data, work / "vit0.zarr", ["train"], 16, error_sample=0)
        log.info("cached vs online epoch")
        epoch = cached_vs_online(work / "cnn.zarr", work)
        log.info("LST vs probe")
        quality = lst_vs_probe(work / "cnn.zarr", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {"efficientnet_lite0": cnn, "vit_small_random": vit, "vit_small_random_no_error_sample": vit0, "epoch_seconds": epoch, "shapes": quality,
               "sizes": {"train_per_class": PER_CLASS, "dev_per_class": 30, "test_per_class": 50,
                         "epochs": EPOCHS, "seeds": SEEDS, "vit_images": VIT_IMAGES}}
    lst = quality["lst"]
    test = [r["test"] for r in lst]
    md = f"""# Image stores (easy-VQA shapes)

| measured | EfficientNet-Lite0 (bundled) | ViT-S/16-sized, random |
|---|---:|---:|
| images | {cnn['images']} | {vit['images']} |
| tokens per image x stored layers x d | {cnn['tokens_per_image']} x {cnn['layers']} x {cnn['hidden_size']} | {vit['tokens_per_image']} x {vit['layers']} x {vit['hidden_size']} |
| `extract()` images/s | {cnn['extract_images_per_s']} | {vit['extract_images_per_s']} |
| bare forward of the same preprocessed batches, images/s | {cnn['bare_images_per_s']} | {vit['bare_images_per_s']} |
| **extract / bare forward** (goal >= 0.9) | **{cnn['ratio']}** | **{vit['ratio']}** |
| the same, `--error-sample 0` (the 32-image error sample is a second forward of {min(32, vit['images'])} of {vit['images']} ViT images) | | **{vit0['ratio']}** |
| fp16 bytes per token per layer on disk (2d = {2 * cnn['hidden_size']} / {2 * vit['hidden_size']}) | {cnn['bytes_per_token_per_layer']} ({cnn['fp16_overhead']:+.2%}) | {vit['bytes_per_token_per_layer']} ({vit['fp16_overhead']:+.2%}) |

Image LST on the EfficientNet-Lite0 store, one epoch of {PER_CLASS * 3} training images (batch {BATCH}):
cached {epoch['cached']} s, online (backbone live on the image files) {epoch['online']} s: **{epoch['speedup']}x**.

LST against the probe, shapes (3 classes; train {PER_CLASS * 3}, dev 90, test 150 images), {EPOCHS} epochs, {SEEDS} seeds:

| | dev | test |
|---|---:|---:|
| probe (mean-pooled stored vector: all 9 pooled stages) | {quality['probe']['dev']:.3f} | {quality['probe']['test']:.3f} |
| LST (defaults: r=8, {lst[0]['trainable_parameters']:,} parameters), best epoch | {np.mean([r['dev_best'] for r in lst]):.3f} | {np.mean(test):.3f} +- {np.std(test):.3f} |
| LST, last epoch (dev) | {np.mean([r['dev_last'] for r in lst]):.3f} | |
"""
    write_results("image", results, md, "python benchmarks/run_all.py image")


def shapes_dataset_subset(data: Path, root: Path, n: int) -> Path:
    """The first n training images (round-robin over the shapes) as their own one-split folder."""
    per = -(-n // len(SHAPES))
    for shape in SHAPES:
        (root / "train" / shape).mkdir(parents=True, exist_ok=True)
        for p in sorted((data / "train" / shape).iterdir())[:per]:
            shutil.copy(p, root / "train" / shape / p.name)
    return root


if __name__ == "__main__":
    main()
