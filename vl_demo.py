"""`lst demo --task vl`: the paper's vision-language setting (CLIP-T5) end to end on SYNTHETIC stand-ins.

From easy-VQA's images and questions (PyPI easy-vqa, bundled): VQA with closed answers (scored from the cache,
and generated with both backbones live), two-image statements (an NLVR2 stand-in: "the two images show the same
shape", true/false) and captions (a COCO stand-in: "a red circle", generated and scored with exact match, BLEU and
CIDEr). The text backbone is a RANDOMLY INITIALISED T5 (no T5 weights ship offline), the image backbone the
bundled EfficientNet-Lite0 (real ImageNet weights). One store per task, one multi-task side network over the three
(`lst train VQA PAIRS CAPTIONS`), each task printed beside its floors.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table


def random_t5(path: Path) -> Path:
    """A small T5 (d=64, 4 + 4 layers) with the bundled MiniLM tokenizer, initialised from seed 0."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from featcache.bundled import minilm_path

    if not (path / "config.json").exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            T5ForConditionalGeneration(T5Config(vocab_size=30522, d_model=64, d_ff=256, d_kv=16, num_layers=4,
                                                num_decoder_layers=4, num_heads=4, pad_token_id=0, eos_token_id=102,
                                                decoder_start_token_id=0)).save_pretrained(path)
        AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return path


def build_stores(out: Path, t5: Path, train_images: int, test_images: int) -> dict[str, Path]:
    from featcache import ExtractConfig, LstError, extract, open_store
    from featcache.bundled import easy_vqa_captions, easy_vqa_dataset, easy_vqa_pairs

    vqa = easy_vqa_dataset(out / f"easy-vqa-{train_images}-{test_images}", train_images, test_images)
    data = {"vqa": (vqa, {}),
            "pairs": (easy_vqa_pairs(vqa, out / "pairs-data"),
                      {"image_column": "left,right", "text_column": "sentence", "label_column": "label"}),
            "captions": (easy_vqa_captions(vqa, out / "captions-data"),
                         {"task": "generate", "label_column": "caption"})}
    stores = {}
    for name, (folder, options) in data.items():
        stores[name] = store = out / f"{name}.zarr"
        try:
            open_store(store)
        except LstError:
            extract(ExtractConfig(model=str(t5), dataset=str(folder), image_model="efficientnet-lite0", out=str(store),
                                  max_length=32, store_dtype="fp16", overwrite=store.exists(), **options))
    return stores


def floors(stores: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Per task: the text alone and one image alone (linear probes on the same stores); captions: the most
    frequent training caption for every image (the text 'caption:' alone)."""
    from featcache import open_store
    from sidetrain.kinds.vision_language.probe import floors as probe_floors

    out = {}
    for name in ("vqa", "pairs"):
        found = probe_floors(open_store(stores[name]))
        out[name] = {"text alone": found["question_only"]["test"], "one image": found["image_only"]["test"]}
    data = stores["captions"].parent / "captions-data"
    train = [json.loads(x)["caption"] for x in (data / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x)["caption"] for x in (data / "test.jsonl").read_text().splitlines()]
    common = Counter(train).most_common(1)[0][0]
    out["captions"] = {"text alone": sum(c == common for c in test) / max(1, len(test))}
    return out


def generated_answers(run: Path, vqa_data: Path, limit: int = 200) -> dict[str, float]:
    """The VQA task's answers generated with both backbones live vs scored from the cache, on test questions."""
    from sidetrain import LadderModel
    from sidetrain.predict import read_examples

    lines = read_examples(str(run), [str(vqa_data / "test.jsonl")], [], [])[:limit]
    names = json.loads((run / "config.json").read_text())["store_manifest"]["task"]["label_names"]
    cached = [names[i] for i in json.loads((run / "predictions.json").read_text())["test"][:len(lines)]]
    made = LadderModel.from_pretrained(run, device="cpu").predict(lines, generate=True, max_new_tokens=6)
    return {"questions": len(lines), "agree": sum(a == b for a, b in zip(made, cached)) / max(1, len(lines))}


def vl_demo(out: Path, epochs: int, batch_size: int, train_images: int, test_images: int, print_results) -> None:
    from sidetrain import TrainConfig, train

    t0 = time.perf_counter()
    stores = build_stores(out, random_t5(out / "t5-random"), train_images, test_images)
    extract_s = time.perf_counter() - t0
    summary = train(TrainConfig(store=[str(p) for p in stores.values()], out=str(out / "vl-run"), epochs=epochs,
                                batch_size=batch_size, reduction_factor=4, resume=False))
    found = floors(stores)
    generated = generated_answers(out / "vl-run" / "tasks" / "vqa", out / f"easy-vqa-{train_images}-{test_images}")
    table = Table(title="lst demo --task vl: one VL-T5 side network over three SYNTHETIC stand-ins (test split)")
    for column in ("task (stands in for)", "metric", "LST, one multi-task model", "floors"):
        table.add_column(column)
    shown = {"vqa": ("VQA / GQA", "accuracy"), "pairs": ("NLVR2", "accuracy"),
             "captions": ("COCO captions", "exact_match")}
    for name, (paper, metric) in shown.items():
        test = summary["tasks"][name]["splits"]["test"]
        extra = f" (CIDEr {test['cider']:.2f}, BLEU-4 {test['bleu_4']:.3f})" if name == "captions" else ""
        table.add_row(f"{name} ({paper})", metric, f"{test[metric]:.3f}{extra}",
                      ", ".join(f"{k} {v:.3f}" for k, v in found[name].items()))
    Console().print(table)
    print_results(summary, title="lst demo --task vl (multi-task: the mean over tasks of each one's metric)",
                  extra={"generated VQA answers == cache-scored": f"{generated['agree']:.3f} of "
                                                                  f"{generated['questions']} test questions",
                         "extract": f"{extract_s:.1f} s", "text backbone": "T5, RANDOMLY initialised (d=64)",
                         "note": "synthetic stand-ins for VQA, NLVR2 and COCO built from easy-VQA; not the real data"})
