"""Training from the store vs LST with the backbone live (--online), in one run, same side network, same data.

    python benchmarks/bench_train.py [--train N] [--epochs E]

Measures on a subset of banking77 (bundled MiniLM-L6) and, when ../shared/data/glue is present, SST-2
(`--device cuda` for the GPU table; a BERT-base-sized backbone with random weights adds a timing-only row):
seconds per epoch cached vs online (both length-bucketed), peak training memory (each mode in a fresh
process: CPU peak RSS above the level after imports), dev/test accuracy cached vs online (fp32 store)
and from an fp16 store, the linear-probe floor, and the time of 8 runs from one store (extraction
included) vs 8 online runs, extrapolated from the measured per-epoch times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, setup_logging, write_results

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
N_RUNS = 8

# one training run in a fresh process, so peak RSS is this mode's own
RUNNER = """
import json, sys, torch
from sidetrain.memory import PeakMemory
from sidetrain import TrainConfig, train
kw = json.loads(sys.argv[1])
with PeakMemory(torch.device("cpu")) as m:
    s = train(TrainConfig(**kw))
s["process_peak_rss_above_imports"] = m.peak_bytes
print("RESULT " + json.dumps(s))
"""


def subset(src: Path, out: Path, sizes: dict[str, int], text: str, quoting: int) -> Path:
    """The first rows of each split, without quotes or tabs in the texts (so any TSV reader agrees)."""
    out.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        frame = pd.read_csv(src / f"{split}.tsv", sep="\t", quoting=quoting, dtype=str)
        frame = frame[~frame[text].str.contains('["\t\n]', regex=True)].head(n)
        frame.to_csv(out / f"{split}.tsv", sep="\t", index=False, quoting=3)
    return out


def run_mode(kw: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(kw)], capture_output=True, text=True, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"training run failed: {proc.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def base_size_backbone(out: Path) -> Path:
    """A BERT-base-sized encoder (d=768, 12 layers, 12 heads) with random weights and MiniLM's tokenizer:
    no base-size weights ship offline, and time per step does not depend on the weights' values."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from featcache.bundled import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size), add_pooling_layer=False).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def bench_speed_only(name: str, model: Path, data: Path, work: Path, epochs: int, device: str) -> dict:
    """Cached vs online seconds per epoch only (for a backbone whose accuracy means nothing)."""
    from featcache import ExtractConfig, extract

    store = work / f"{name}.zarr"
    t0 = time.perf_counter()
    extract(ExtractConfig(model=str(model), dataset=str(data), out=str(store), max_length=64, device=device,
                          quoting="none"))
    extract_seconds = time.perf_counter() - t0
    common = {"store": str(store), "epochs": epochs, "batch_size": 32, "seed": 0, "device": device}
    runs = {label: run_mode({**common, **kw, "out": str(work / f"{name}-{label}")})
            for label, kw in [("cached", {}), ("online", {"online": True})]}
    c, o = runs["cached"], runs["online"]
    return {"task": name, "epochs": epochs, "extract_seconds": extract_seconds,
            "seconds_per_epoch": {k: runs[k]["seconds_per_epoch"] for k in runs},
            "epoch_speedup_cached_vs_online": o["seconds_per_epoch"] / c["seconds_per_epoch"],
            "data_wait_fraction_cached": c["data_wait_fraction"],
            "peak_train_loop_bytes": {k: runs[k]["peak_memory_bytes"] for k in runs},
            "peak_memory_kind": c["peak_memory_kind"], "trainable_parameters": c["trainable_parameters"]}


def bench_task(name: str, data: Path, work: Path, epochs: int, max_length: int, quoting: str,
               device: str = "cpu") -> dict:
    from featcache import ExtractConfig, extract
    from featcache.bundled import minilm_path

    stores = {}
    extract_seconds = {}
    for dtype in ("fp32", "fp16"):
        t0 = time.perf_counter()
        stores[dtype] = work / f"{name}-{dtype}.zarr"
        extract(ExtractConfig(model=str(minilm_path()), dataset=str(data), out=str(stores[dtype]), store_dtype=dtype,
                              max_length=max_length, device=device, quoting=quoting))
        extract_seconds[dtype] = time.perf_counter() - t0
    common = {"epochs": epochs, "batch_size": 32, "seed": 0, "device": device, "warmup_steps": -1}
    runs = {}
    fp32 = str(stores["fp32"])
    for label, kw in [("cached", {"store": fp32}), ("online", {"store": fp32, "online": True}),
                      ("cached_fp16", {"store": str(stores["fp16"])}), ("probe", {"store": fp32, "head": "probe"}),
                      # the same comparison with fewer, wider side heads (the default is the backbone's 12)
                      ("cached_h4", {"store": fp32, "side_heads": 4}),
                      ("online_h4", {"store": fp32, "online": True, "side_heads": 4})]:
        log.info("%s: %s", name, label)
        runs[label] = run_mode({**common, **kw, "out": str(work / f"{name}-{label}")})
    c, o = runs["cached"], runs["online"]
    ratio = o["seconds_per_epoch"] / c["seconds_per_epoch"]
    ratio_h4 = runs["online_h4"]["seconds_per_epoch"] / runs["cached_h4"]["seconds_per_epoch"]
    # N runs of `epochs` epochs each: the store is written once, online pays the backbone every epoch
    n_cached = extract_seconds["fp32"] + N_RUNS * c["train_seconds"]
    n_online = N_RUNS * o["train_seconds"]
    metric = c["metric"]
    acc = {k: {s: runs[k]["splits"][s][metric] for s in runs[k]["splits"]} for k in runs}
    return {"task": name, "epochs": epochs, "max_length": max_length, "extract_seconds": extract_seconds,
            "seconds_per_epoch": {k: runs[k]["seconds_per_epoch"]
                                  for k in ("cached", "online", "cached_fp16", "cached_h4", "online_h4")},
            "epoch_speedup_cached_vs_online": ratio,
            "epoch_speedup_cached_vs_online_4_side_heads": ratio_h4,
            "data_wait_fraction_cached": c["data_wait_fraction"],
            "peak_rss_above_imports_bytes": {k: runs[k]["process_peak_rss_above_imports"] for k in ("cached", "online")},
            "peak_train_loop_bytes": {k: runs[k]["peak_memory_bytes"] for k in ("cached", "online")},
            "metric": metric, "scores": acc,
            "fp32_cached_equals_online": acc["cached"] == acc["online"],
            "fp16_minus_fp32": {s: acc["cached_fp16"][s] - acc["cached"][s] for s in acc["cached"]},
            f"time_{N_RUNS}_runs_seconds": {"cached_incl_extraction": n_cached, "online": n_online,
                                             "speedup": n_online / n_cached,
                                             "how": f"extraction + {N_RUNS} x one measured cached run vs "
                                                    f"{N_RUNS} x one measured online run (extrapolated)"},
            "trainable_parameters": c["trainable_parameters"]}


def markdown(results: list[dict], speed_only: list[dict], args) -> str:
    lines = ["# Training: cached (store) vs online (backbone live)", "",
             (f"Bundled MiniLM-L6 (fp32 compute), side network r=8, batch 32, {args.epochs} epoch(s) per run, "
              f"length-bucketed batches in both modes; each mode trained in its own process; device {args.device}."),
             "",
             ("| task | s/epoch cached | s/epoch online | speed-up | speed-up, 4 side heads | data wait "
              "| peak RSS cached | peak RSS online | dev cached | dev online | dev fp16 store | probe dev | 8 runs cached+extract | 8 runs online |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, mem, sc = r["seconds_per_epoch"], r["peak_rss_above_imports_bytes"], r["scores"]
        n = r[f"time_{N_RUNS}_runs_seconds"]
        lines.append(f"| {r['task']} | {s['cached']:.1f} | {s['online']:.1f} | {r['epoch_speedup_cached_vs_online']:.1f}x "
                     f"| {r['epoch_speedup_cached_vs_online_4_side_heads']:.1f}x "
                     f"| {r['data_wait_fraction_cached']:.1%} | {mem['cached'] / 2**20:,.0f} MiB | "
                     f"{mem['online'] / 2**20:,.0f} MiB | {sc['cached']['dev']:.4f} | {sc['online']['dev']:.4f} | "
                     f"{sc['cached_fp16']['dev']:.4f} | {sc['probe']['dev']:.4f} | {n['cached_incl_extraction']:.0f} s | "
                     f"{n['online']:.0f} s ({n['speedup']:.1f}x) |")
    if speed_only:
        lines += ["", ("Timing only, a BERT-base-sized backbone (d=768, 12 layers; random weights, since none ship "
                       "offline; time per step does not depend on the weights), banking77 subset, fp16 store:"), "",
                  "| backbone | s/epoch cached | s/epoch online | speed-up | data wait | peak train-loop memory cached / online |",
                  "|---|---|---|---|---|---|"]
        for r in speed_only:
            s, mem = r["seconds_per_epoch"], r["peak_train_loop_bytes"]
            lines.append(f"| {r['task']} | {s['cached']:.1f} | {s['online']:.1f} | {r['epoch_speedup_cached_vs_online']:.1f}x "
                         f"| {r['data_wait_fraction_cached']:.1%} | {mem['cached'] / 2**20:,.0f} / "
                         f"{mem['online'] / 2**20:,.0f} MiB ({r['peak_memory_kind']}) |")
    lines += ["", (f"Subsets: {args.train} train / {args.dev} dev rows (banking77 also {args.test} test). "
              "8-run times are extrapolated from one measured run of each mode. Peak RSS: process RSS above the "
              "level after imports, including the preloaded store (cached) or the backbone (online). "
              "The shared CPU is noisy: compare the ratios, measured side by side in this run.")]
    return "\n".join(lines) + "\n"


def main() -> None:
    setup_logging()
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--dev", type=int, default=400)
    p.add_argument("--test", type=int, default=400)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--no-glue", action="store_true")
    p.add_argument("--no-base", action="store_true", help="skip the BERT-base-sized timing row")
    p.add_argument("--device", default="cpu", help="cpu or cuda (GPU figures: CUDA peak-memory counters)")
    args = p.parse_args()
    from featcache.bundled import bolt_dataset_path

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        bank = subset(bolt_dataset_path("banking"), work / "banking", {"train": args.train, "dev": args.dev,
                                                                     "test": args.test}, "text", 0)
        results.append(bench_task("banking77", bank, work, args.epochs, 64, "none", args.device))
        if (GLUE / "SST-2").is_dir() and not args.no_glue:
            sst = subset(GLUE / "SST-2", work / "sst2", {"train": args.train, "dev": args.dev}, "sentence", 3)
            results.append(bench_task("sst2", sst, work, args.epochs, 64, "none", args.device))
        else:
            log.info("SST-2 skipped (%s)", "--no-glue" if args.no_glue else f"GLUE not found at {GLUE}")
        speed_only = []
        if not args.no_base:
            log.info("BERT-base-sized backbone: cached vs online")
            base = base_size_backbone(work / "bert-base-size")
            speed_only.append(bench_speed_only("bert-base-size", base, bank, work, args.epochs, args.device))
    write_results("train", {"args": vars(args), "results": results, "speed_only": speed_only},
                  markdown(results, speed_only, args),
                  "python benchmarks/bench_train.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
