"""VL-T5 (#22): a T5 text backbone beside an image backbone, on easy-VQA and two-image statements built from it.

No T5 weights ship offline: the T5 is RANDOMLY INITIALISED (d=64, 4 + 4 layers, the bundled MiniLM tokenizer,
seeded), so every figure here is about the pipeline (cache == live, generation, two images), not about T5's
language knowledge. Images: the bundled EfficientNet-Lite0 (real ImageNet weights), 49 tokens per image.

1. VQA (easy-VQA, answers as text): accuracy scored from the cache (every candidate answer's log-probability,
   teacher-forced) on test; the same run's answers GENERATED (greedy, backbones live) on the first
   LST_BENCH_VLT5_GENERATE test questions: agreement with the cache-scored answers (goal >= 95%) and exact match
   with the gold answer; floors: the question-only probe and the image-only probe (same store).
2. Two-image statements (featcache.bundled.easy_vqa_pairs, NLVR2-style, synthetic): true/false scored from the
   cache with both images; floors: the statement alone (probe) and the same network with the left image only.
3. Cached vs online (both backbones live): seconds per step and peak memory over the same first steps; store
   bytes, image part vs text part.
4. Captions (featcache.bundled.easy_vqa_captions, a COCO stand-in, `--task generate`): exact match, BLEU-4 and
   CIDEr of generated captions; and one multi-task model over VQA, statements and captions against each task's
   single-task run (goal: within 1 point).

Sizes: LST_BENCH_VLT5_TRAIN_IMAGES (300), LST_BENCH_VLT5_TEST_IMAGES (100), LST_BENCH_VLT5_EPOCHS (20, the paper's),
LST_BENCH_VLT5_WORK (reuse stores and finished runs). Results: benchmarks/results/vl_t5.*
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import log, setup_logging, write_results

from featcache import ExtractConfig, extract, open_store
from featcache.bundled import easy_vqa_captions, easy_vqa_dataset, easy_vqa_pairs
from sidetrain import LadderModel, TrainConfig, train
from sidetrain.kinds.vision_language.probe import floors
from sidetrain.predict import read_examples
from sidetrain.text_metrics import exact_match
from vl_demo import random_t5  # the demo's T5: d=64, 4 + 4 layers, seed 0

TRAIN_IMAGES = int(os.environ.get("LST_BENCH_VLT5_TRAIN_IMAGES", "300"))
TEST_IMAGES = int(os.environ.get("LST_BENCH_VLT5_TEST_IMAGES", "100"))
EPOCHS = int(os.environ.get("LST_BENCH_VLT5_EPOCHS", "20"))
GENERATE = int(os.environ.get("LST_BENCH_VLT5_GENERATE", "300"))
STEPS = 10  # cached vs online: the same first steps
OPTIONS = {"reduction_factor": 4, "lr": 3e-3, "batch_size": 32}  # the paper's VL r and lr


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def store(model: Path, data: Path, out: Path, **kw) -> Path:
    if not (out / "zarr.json").exists():
        extract(ExtractConfig(model=str(model), dataset=str(data), image_model="efficientnet-lite0", out=str(out),
                              max_length=32, store_dtype="fp32", **kw))
    return out


def run(store_path: Path | list[str], out: Path, **kw) -> dict[str, Any]:
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    stores = store_path if isinstance(store_path, list) else str(store_path)
    return train(TrainConfig(**{"store": stores, "out": str(out), "epochs": EPOCHS, "resume": False, **OPTIONS, **kw}))


def store_facts(path: Path) -> dict[str, Any]:
    manifest = open_store(path).manifest
    image = sum(folder_bytes(path / s / "images") for s in manifest["splits"])
    return {"store_bytes": folder_bytes(path), "image_part_bytes": image, "text_part_bytes": folder_bytes(path) - image,
            "images": manifest["vision_language"]["images"], "rows": manifest["vision_language"]["questions"]}


def generated_vs_cached(run_dir: Path, data: Path, split: str = "test") -> dict[str, Any]:
    """The run's answers generated live vs scored from the cache (predictions.json) and vs the gold answers."""
    lines = read_examples(str(run_dir), [str(data / f"{split}.jsonl")], [], [])[:GENERATE]
    gold = [json.loads(x)["answer"] for x in (data / f"{split}.jsonl").read_text().splitlines()[:len(lines)]]
    names = json.loads((run_dir / "config.json").read_text())["store_manifest"]["task"]["label_names"]
    cached = [names[i] for i in json.loads((run_dir / "predictions.json").read_text())[split][:len(lines)]]
    model = LadderModel.from_pretrained(run_dir, device="cpu").eval()
    t0 = time.perf_counter()
    made = model.predict(lines, generate=True, max_new_tokens=6)
    seconds = time.perf_counter() - t0
    return {"questions": len(lines), "agree_with_cache": exact_match(made, [[c] for c in cached]),
            "generated_exact_match": exact_match(made, [[g] for g in gold]),
            "cached_accuracy_same_questions": exact_match(cached, [[g] for g in gold]),
            "seconds_per_question": seconds / max(1, len(lines)), "examples": list(zip(lines[:3], made[:3]))}


def per_step(store_path: Path, out: Path, online: bool) -> dict[str, Any]:
    s = run(store_path, out, online=online, max_steps=STEPS, epochs=1)
    return {"seconds_per_step": s["train_seconds"] / max(1, s["steps"]), "peak_memory_bytes": s["peak_memory_bytes"]}


def main() -> None:
    setup_logging()
    work = Path(os.environ.get("LST_BENCH_VLT5_WORK") or tempfile.mkdtemp(prefix="bench_vl_t5_"))
    work.mkdir(parents=True, exist_ok=True)
    t5 = random_t5(work / "t5")
    vqa_data = easy_vqa_dataset(work / "vqa_data", TRAIN_IMAGES, TEST_IMAGES)
    pair_data = easy_vqa_pairs(vqa_data, work / "pair_data")
    r: dict[str, Any] = {"train_images": TRAIN_IMAGES, "test_images": TEST_IMAGES, "epochs": EPOCHS, **OPTIONS}
    vqa = store(t5, vqa_data, work / "vqa.zarr")
    pairs = store(t5, pair_data, work / "pairs.zarr", image_column="left,right", text_column="sentence",
                  label_column="label")
    left = store(t5, pair_data, work / "left.zarr", image_column="left", text_column="sentence", label_column="label")
    r["stores"] = {n: store_facts(p) for n, p in (("vqa", vqa), ("pairs", pairs), ("left_only", left))}
    r["vqa"] = {"lst": run(vqa, work / "vqa_run")["splits"], "floors": floors(open_store(vqa))}
    log.info("vqa: %s", r["vqa"])
    r["vqa"]["generated"] = generated_vs_cached(work / "vqa_run", vqa_data)
    log.info("generated: %s", r["vqa"]["generated"])
    r["pairs"] = {"two_images": run(pairs, work / "pairs_run")["splits"],
                  "left_image_only": run(left, work / "left_run")["splits"],
                  "statement_only": floors(open_store(left))["question_only"]}
    log.info("pairs: %s", r["pairs"])
    captions = store(t5, easy_vqa_captions(vqa_data, work / "caption_data"), work / "captions.zarr", task="generate",
                     label_column="caption")
    r["stores"]["captions"] = store_facts(captions)
    single = {"vqa": r["vqa"]["lst"], "pairs": r["pairs"]["two_images"],
              "captions": run(captions, work / "captions_run")["splits"]}
    multi = run([str(vqa), str(pairs), str(captions)], work / "multitask_run")
    r["multitask"] = {"single": single, "multi": {name: t["splits"] for name, t in multi["tasks"].items()},
                      "train_seconds": multi["train_seconds"]}
    log.info("multitask: %s", r["multitask"])
    cached, online = per_step(vqa, work / "cached_steps", False), per_step(vqa, work / "online_steps", True)
    r["cached_vs_online"] = {"cached": cached, "online": online,
                             "online_over_cached": online["seconds_per_step"] / cached["seconds_per_step"]}
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("LST_BENCH_VLT5_"))
    write_results("vl_t5", r, markdown(r), f"{env} python benchmarks/bench_vl_t5.py".strip())


def markdown(r: dict[str, Any]) -> str:
    mib = 2 ** 20
    v, p, g, c = r["vqa"], r["pairs"], r["vqa"]["generated"], r["cached_vs_online"]
    acc = (lambda splits, s="test": f"{splits[s]['accuracy']:.3f}")
    lines = [(f"# VL-T5 on easy-VQA and two-image statements (random T5 d=64 + EfficientNet-Lite0; "
             f"{r['train_images']} train / {r['test_images']} test images, r={r['reduction_factor']}, "
             f"lr {r['lr']}, {r['epochs']} epochs)"), "",
             "The T5 is randomly initialised (no T5 weights ship offline): these figures test the pipeline, not T5.",
             "", "| task | LST (cache-scored) | floors |", "|---|---|---|",
             (f"| VQA (test accuracy) | {acc(v['lst'])} | question only {v['floors']['question_only']['test']:.3f}, "
             f"image only {v['floors']['image_only']['test']:.3f} |"),
             (f"| two-image statements (test accuracy) | {acc(p['two_images'])} | statement only "
             f"{p['statement_only']['test']:.3f}, left image only (same network) {acc(p['left_image_only'])} |"), "",
             (f"Generated answers (greedy, both backbones live) on the first {g['questions']} test questions: "
             f"{g['agree_with_cache']:.3f} agree with the cache-scored answers (goal >= 0.95); exact match with "
             f"the gold answer {g['generated_exact_match']:.3f} (cache-scored on the same questions: "
             f"{g['cached_accuracy_same_questions']:.3f}); {g['seconds_per_question'] * 1000:.0f} ms per question."),
             "", "| store | rows | images | image part MiB | text part MiB |", "|---|---|---|---|---|"]
    for name, s in r["stores"].items():
        lines.append(f"| {name} | {sum(s['rows'].values())} | {sum(s['images'].values())} | "
                     f"{s['image_part_bytes'] / mib:.1f} | {s['text_part_bytes'] / mib:.1f} |")
    m = r["multitask"]
    metric = {"vqa": "accuracy", "pairs": "accuracy", "captions": "exact_match"}
    lines += ["", ("One multi-task model (VQA + statements + captions, proportional sampling) vs each task's own run, "
              "test split:"), "", "| task | metric | single-task | multi-task |", "|---|---|---|---|"]
    for name, key in metric.items():
        lines.append(f"| {name} | {key} | {m['single'][name]['test'][key]:.3f} | {m['multi'][name]['test'][key]:.3f} |")
    for which in ("single", "multi"):
        cap = m[which]["captions"]["test"]
        lines += ["", (f"Captions ({which}-task, greedy, test): exact match {cap['exact_match']:.3f}, BLEU-1 "
                       f"{cap['bleu_1']:.3f}, BLEU-4 {cap['bleu_4']:.3f} (three-word captions: no 4-grams), CIDEr "
                       f"{cap['cider']:.2f}.")]
    lines += ["", f"Multi-task training time: {m['train_seconds']:.0f} s (three tasks, {r['epochs']} epochs)."]
    lines += ["", (f"Cached vs online over the same first {STEPS} steps: {c['cached']['seconds_per_step']:.3f} s vs "
              f"{c['online']['seconds_per_step']:.3f} s per step ({c['online_over_cached']:.1f}x); peak memory "
              f"{c['cached']['peak_memory_bytes'] / mib:.0f} MiB vs {c['online']['peak_memory_bytes'] / mib:.0f} MiB.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
