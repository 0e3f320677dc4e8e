"""Vision-language LST (#13) on easy-VQA, measured in one run (docs/vision_language.md).

1. The store: MiniLM-L6 (questions) + EfficientNet-Lite0 (images) over the first N easy-VQA training images (a
   tenth of them dev) and M test images, fp16. Bytes of the images part against images x tokens x d x 2 (each
   image stored once), and against what one copy per question would take.
2. Accuracy with the default settings (`lst train STORE`: r = 8, lr 3e-3, batch 32) against the floors from
   the same store: the question-only probe (`--head probe`) and an image-only probe. Goal: test >= 0.95.
3. Cached against online (both backbones live) LST: seconds per training step and peak training memory over
   the same first steps (the online epoch recomputes EfficientNet on every question's image: the expensive
   part), extrapolated to an epoch.
4. Levers (LST_BENCH_VL_LEVERS=1): r = 4 (the paper's), lr, epochs, pooling, one change each.

Sizes: LST_BENCH_VL_TRAIN_IMAGES (default 1000), LST_BENCH_VL_TEST_IMAGES (200), LST_BENCH_VL_EPOCHS (10),
LST_BENCH_VL_ONLINE_STEPS (12), LST_BENCH_VL_STORE (reuse an extracted store), LST_BENCH_VL_WORK (the runs'
folder; finished runs there are read back, not retrained). Results: benchmarks/results/vl.*
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import log, setup_logging, timed, write_results

from featcache import ExtractConfig, extract, open_store
from featcache.bundled import easy_vqa_dataset, minilm_path
from sidetrain import TrainConfig, train
from sidetrain.kinds.vision_language.probe import floors

TRAIN_IMAGES = int(os.environ.get("LST_BENCH_VL_TRAIN_IMAGES", "1000"))
TEST_IMAGES = int(os.environ.get("LST_BENCH_VL_TEST_IMAGES", "200"))
EPOCHS = int(os.environ.get("LST_BENCH_VL_EPOCHS", "10"))
ONLINE_STEPS = int(os.environ.get("LST_BENCH_VL_ONLINE_STEPS", "12"))
REDUCTION = TrainConfig.reduction_factor  # lst train's default (8): measured as good as the paper's 4 here
LEVERS = {"r=4": {"reduction_factor": 4}, "lr=1e-3": {"lr": 1e-3}, "epochs x2": {"epochs": 2 * EPOCHS},
          "pooling=cls": {"pooling": "cls"}}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def store_facts(store: Path) -> dict[str, Any]:
    manifest = open_store(store).manifest
    vl, images = manifest["vision_language"], manifest["parts"]["images"]
    tokens, width = int(manifest["image"]["tokens"]), int(images["hidden_size"])
    image_bytes = sum(folder_bytes(store / s / "images") for s in manifest["splits"])
    n_images, n_questions = sum(vl["images"].values()), sum(vl["questions"].values())
    value = 2 if manifest["store_dtype"] in ("fp16", "bf16") else 4 if manifest["store_dtype"] == "fp32" else 1
    return {"images": n_images, "questions": n_questions, "image_tokens": tokens, "image_width": width,
            "store_bytes": folder_bytes(store), "image_part_bytes": image_bytes,
            "text_part_bytes": folder_bytes(store) - image_bytes,
            "images_x_tokens_x_d_x_bytes": n_images * tokens * width * value,
            "one_copy_per_question_bytes": n_questions * tokens * width * value}


def run(store: Path, out: Path, **kw) -> dict[str, Any]:
    """One training run; a finished one in LST_BENCH_VL_WORK is read back instead of trained again."""
    if os.environ.get("LST_BENCH_VL_WORK") and (out / "metrics.json").exists():
        summary = json.loads((out / "metrics.json").read_text())
    else:
        summary = train(TrainConfig(**{"store": str(store), "out": str(out), "reduction_factor": REDUCTION,
                                       "epochs": EPOCHS, "resume": False, **kw}))
    return {k: summary[k] for k in ("splits", "train_seconds", "steps", "peak_memory_bytes", "history", "mode")}


def per_step(store: Path, out: Path, online: bool) -> dict[str, Any]:
    s = run(store, out, online=online, max_steps=ONLINE_STEPS, epochs=1)
    return {"seconds_per_step": s["train_seconds"] / max(1, s["steps"]), "peak_memory_bytes": s["peak_memory_bytes"],
            "steps": s["steps"]}


def main() -> None:
    setup_logging()
    work = Path(os.environ.get("LST_BENCH_VL_WORK") or tempfile.mkdtemp(prefix="bench_vl_"))
    work.mkdir(parents=True, exist_ok=True)
    store = Path(os.environ.get("LST_BENCH_VL_STORE") or work / "vqa.zarr")
    results: dict[str, Any] = {"train_images": TRAIN_IMAGES, "test_images": TEST_IMAGES, "epochs": EPOCHS,
                               "reduction_factor": REDUCTION}
    if not (store / "zarr.json").exists():
        data = easy_vqa_dataset(work / "data", TRAIN_IMAGES, TEST_IMAGES)
        seconds, _ = timed(lambda: extract(ExtractConfig(
            model=str(minilm_path()), dataset=str(data), image_model="efficientnet-lite0", out=str(store),
            max_length=32, store_dtype="fp16")))
        results["extract_seconds"] = seconds
    results["store"] = store_facts(store)
    log.info("store: %s", results["store"])
    results["default"] = run(store, work / "default")
    log.info("default: %s", results["default"]["splits"])
    steps_per_epoch = -(-len(open_store(store).split("train")) // TrainConfig.batch_size)
    cached, online = per_step(store, work / "cached", False), per_step(store, work / "online", True)
    results["cached_vs_online"] = {"cached": cached, "online": online, "steps_per_epoch": steps_per_epoch,
                                   "online_over_cached": online["seconds_per_step"] / cached["seconds_per_step"]}
    log.info("cached vs online: %s", results["cached_vs_online"])
    results["floors"] = floors(open_store(store))
    log.info("floors: %s", results["floors"])
    if os.environ.get("LST_BENCH_VL_LEVERS"):
        results["levers"] = {name: run(store, work / name.replace(" ", "_").replace("=", "_"), **kw)
                             for name, kw in LEVERS.items()}
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("LST_BENCH_VL_"))
    write_results("vl", results, markdown(results), f"{env} python benchmarks/bench_vl.py".strip())


def markdown(r: dict[str, Any]) -> str:
    s, d, c = r["store"], r["default"], r["cached_vs_online"]
    mib = 2 ** 20
    lines = ["# Vision-language LST on easy-VQA (MiniLM-L6 + EfficientNet-Lite0)", "",
             (f"{r['train_images']} easy-VQA training images (a tenth of them dev) and {r['test_images']} test images; "
             f"{s['questions']} questions over {s['images']} images; fp16 store; r={r['reduction_factor']}, "
             f"{r['epochs']} epochs."), "",
             "| | dev accuracy | test accuracy |", "|---|---|---|",
             f"| VL LST (defaults) | {d['splits']['dev']['accuracy']:.4f} | {d['splits']['test']['accuracy']:.4f} |"]
    for name, scores in r["floors"].items():
        lines.append(f"| {name.replace('_', '-')} probe | {scores['dev']:.4f} | {scores['test']:.4f} |")
    for name, lever in (r.get("levers") or {}).items():
        lines.append(f"| lever: {name} | {lever['splits']['dev']['accuracy']:.4f} | "
                     f"{lever['splits']['test']['accuracy']:.4f} |")
    lines += ["", (f"Training (defaults): {d['train_seconds']:.0f} s for {d['steps']} steps, peak memory "
              f"{d['peak_memory_bytes'] / mib:,.0f} MiB."), "",
              "## Store bytes", "",
              (f"Image part {s['image_part_bytes'] / mib:,.1f} MiB for {s['images']} images x {s['image_tokens']} "
              f"tokens x {s['image_width']} channels (images x tokens x d x 2 bytes = "
              f"{s['images_x_tokens_x_d_x_bytes'] / mib:,.1f} MiB); one copy per question would be "
              f"{s['one_copy_per_question_bytes'] / mib:,.1f} MiB. Text part {s['text_part_bytes'] / mib:,.1f} MiB; "
              f"the whole store {s['store_bytes'] / mib:,.1f} MiB."), "",
              "## Cached vs online", "",
              "| | s / step | epoch (extrapolated) | peak training memory |", "|---|---|---|---|"]
    for mode in ("cached", "online"):
        m = c[mode]
        lines.append(f"| {mode} | {m['seconds_per_step']:.3f} | {m['seconds_per_step'] * c['steps_per_epoch']:.0f} s | "
                     f"{m['peak_memory_bytes'] / mib:,.0f} MiB |")
    lines += ["", (f"Online / cached time per step: {c['online_over_cached']:.1f}x (first {c['cached']['steps']} "
              "steps of each; online runs MiniLM and EfficientNet-Lite0 on every batch).")]
    if "extract_seconds" in r:
        lines += ["", f"Extraction: {r['extract_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
