"""A hyper-parameter sweep from one store against the same trials run online (bundled MiniLM + banking77).

1. Sweep: extract the store once, then `run_sweep` over T trials (pruning off, so every trial does the
   same work as its online twin). Wall time includes the extraction.
2. Online: one `lst train --online` run (the backbone recomputes every batch) and one cached run of the
   same settings, measured in this process. T online trials are EXTRAPOLATED, not run:
       online_sweep ~= sum(cached trial times in the sweep) + T * (online run - cached run)
   i.e. each trial pays the measured backbone overhead on top of its own side-network cost.
3. Stacked: K trials of one network shape and batch size trained in one pass (sidetrain.search.stacked),
   against the same K trials one after the other; then the whole sweep again with --stack K.

Sizes: LST_BENCH_SWEEP_TRIALS (16), LST_BENCH_SWEEP_TRAIN (1000 banking77 train rows, seeded sample),
LST_BENCH_SWEEP_DEV (200), LST_BENCH_SWEEP_EPOCHS (3), LST_BENCH_SWEEP_STACK (4), LST_BENCH_THREADS (torch's default; set 1 on a
shared, loaded machine: torch's thread pool spins when oversubscribed). Results: benchmarks/results/sweep.json and sweep.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: `common` sits beside it
from common import log, setup_logging, timed, write_results

from featcache import ExtractConfig, extract, open_store
from featcache.bundled import bolt_dataset_path, minilm_path
from sidetrain import TrainConfig, train
from sidetrain.search.sweep import SweepConfig, run_sweep

TRIALS = int(os.environ.get("LST_BENCH_SWEEP_TRIALS", "16"))
N_TRAIN = int(os.environ.get("LST_BENCH_SWEEP_TRAIN", "1000"))
N_DEV = int(os.environ.get("LST_BENCH_SWEEP_DEV", "200"))
EPOCHS = int(os.environ.get("LST_BENCH_SWEEP_EPOCHS", "3"))
THREADS = int(os.environ.get("LST_BENCH_THREADS", str(torch.get_num_threads())))
STACK = int(os.environ.get("LST_BENCH_SWEEP_STACK", "4"))
BATCH = 32
MAX_LENGTH = 64  # as `lst demo`
COMMAND = "python benchmarks/run_all.py sweep  (part of make bench)"
SPACE = {"lr": {"low": 3e-4, "high": 1e-2, "log": True}, "reduction_factor": [4, 8, 16],
         "batch_size": BATCH, "epochs": EPOCHS, "seed": 0}
REFERENCE = {"reduction_factor": 8, "lr": 3e-3, "batch_size": BATCH, "epochs": EPOCHS, "seed": 0}


def subset(root: Path) -> Path:
    """A seeded sample of banking77 train (all 77 intents) and dev rows."""
    import pandas as pd

    folder = root / "banking"
    folder.mkdir(parents=True, exist_ok=True)
    src = bolt_dataset_path("banking")
    for split, n in (("train", N_TRAIN), ("dev", N_DEV)):
        frame = pd.read_csv(src / f"{split}.tsv", sep="\t")
        frame.sample(n=min(n, len(frame)), random_state=0).to_csv(folder / f"{split}.tsv", sep="\t", index=False)
    return folder


def stacked_speedup(store_path: Path, root: Path, k: int) -> dict[str, Any] | None:
    try:
        from sidetrain.search.stacked import train_stacked
    except ImportError:
        return None
    store = open_store(store_path)
    lrs = [1e-3 * (1.5 ** i) for i in range(k)]
    cfgs = [TrainConfig(store=str(store_path), out=str(root / f"sep{i}"), device="cpu", **{**REFERENCE, "lr": lr})
            for i, lr in enumerate(lrs)]
    separate_s, separate = timed(lambda: [train(c, store=store) for c in cfgs])
    stack_cfgs = [TrainConfig(**{**c.__dict__, "out": str(root / f"stk{i}")}) for i, c in enumerate(cfgs)]
    stacked_s, stacked = timed(lambda: train_stacked(stack_cfgs, store=store))
    return {"k": k, "separate_seconds": round(separate_s, 1), "stacked_seconds": round(stacked_s, 1),
            "speedup": round(separate_s / stacked_s, 2),
            "best_eval_separate": [round(s["best_eval"], 4) for s in separate],
            "best_eval_stacked": [round(s["best_eval"], 4) for s in stacked]}


def main() -> None:
    setup_logging()
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix="lst-bench-sweep-") as tmp:
        root = Path(tmp)
        data = subset(root)
        store_path = root / "store.zarr"
        log.info("extracting %d + %d banking77 rows with MiniLM", N_TRAIN, N_DEV)
        extract_s, _ = timed(lambda: extract(ExtractConfig(model=str(minilm_path()), dataset=str(data),
                                                           out=str(store_path), max_length=MAX_LENGTH,
                                                           store_dtype="fp16", device="cpu")))
        store = open_store(store_path)
        log.info("sweep of %d trials", TRIALS)
        sweep_s, summary = timed(lambda: run_sweep(SweepConfig(store=str(store_path), out=str(root / "sweep"),
                                                               trials=TRIALS, space=SPACE, prune=False,
                                                               device="cpu", threads=THREADS), store=store))
        trial_s = [t["duration_s"] for t in summary["trials"] if t["state"] == "COMPLETE"]
        log.info("one online and one cached run of the reference settings %s", REFERENCE)
        cached_s, cached = timed(lambda: train(TrainConfig(store=str(store_path), out=str(root / "cached"),
                                                           device="cpu", **REFERENCE), store=store))
        online_s, online = timed(lambda: train(TrainConfig(store=str(store_path), out=str(root / "online"),
                                                           device="cpu", online=True, **REFERENCE), store=store))
        overhead = online_s - cached_s
        online_sweep_s = sum(trial_s) + len(trial_s) * overhead
        cache_total = extract_s + sweep_s
        stacked = stacked_speedup(store_path, root, k=STACK)
        stacked_sweep_s = None
        if STACK > 1:
            log.info("the same sweep with --stack %d", STACK)
            stacked_sweep_s, _ = timed(lambda: run_sweep(SweepConfig(
                store=str(store_path), out=str(root / "sweep_stacked"), trials=TRIALS, space=SPACE, prune=False,
                device="cpu", threads=THREADS, stack=STACK), store=store))

    results = {
        "setup": {"backbone": "all-MiniLM-L6-v2 (bundled)", "data": f"banking77 {N_TRAIN} train / {N_DEV} dev",
                  "trials": TRIALS, "epochs": EPOCHS, "batch_size": BATCH, "space": SPACE, "threads": THREADS,
                  "pruning": False},
        "extract_seconds": round(extract_s, 1), "sweep_seconds": round(sweep_s, 1),
        "cache_total_seconds": round(cache_total, 1),
        "trial_seconds_mean": round(sum(trial_s) / len(trial_s), 2),
        "reference_cached_seconds": round(cached_s, 1), "reference_online_seconds": round(online_s, 1),
        "online_sweep_seconds_extrapolated": round(online_sweep_s, 1),
        "speedup_vs_online": round(online_sweep_s / cache_total, 2),
        "trials_per_hour_incl_extraction": round(TRIALS / cache_total * 3600),
        "trials_per_hour_from_store": round(TRIALS / sweep_s * 3600),
        "online_trials_per_hour": round(3600 / online_s),
        "best": {"value": summary["best"]["value"], "params": summary["best"]["params"]},
        "reference_dev_accuracy": {"cached": cached["best_eval"], "online": online["best_eval"]},
        "stacked": stacked,
        "stacked_sweep_seconds": None if stacked_sweep_s is None else round(stacked_sweep_s, 1),
        "stacked_speedup_vs_online": None if stacked_sweep_s is None
        else round(online_sweep_s / (extract_s + stacked_sweep_s), 2),
    }
    md = [
        "# Sweep from one store vs online LST trials",
        "",
        (f"MiniLM-L6 + banking77 ({N_TRAIN} train / {N_DEV} dev rows), {TRIALS} trials of {EPOCHS} epochs, batch "
        f"{BATCH}, pruning off, {THREADS} torch thread(s)."),
        "",
        "| | seconds | trials / hour |",
        "|---|---:|---:|",
        f"| extraction (once) | {extract_s:.0f} | |",
        f"| sweep of {TRIALS} trials from the store | {sweep_s:.0f} | {results['trials_per_hour_from_store']:,} |",
        (f"| **store total (extraction + sweep)** | **{cache_total:.0f}** | "
        f"**{results['trials_per_hour_incl_extraction']:,}** |"),
        f"| {TRIALS} online trials (extrapolated) | {online_sweep_s:.0f} | {results['online_trials_per_hour']:,} |",
        "",
        f"**Speed-up of the store over online: {results['speedup_vs_online']}x** (goal: at least 4x).",
        "",
        (f"The online figure is extrapolated, not run: one online run of the reference settings took {online_s:.0f} s "
        f"against {cached_s:.0f} s for the same run from the store, so each of the {TRIALS} trials is charged its "
        f"measured cached time plus that {overhead:.0f} s backbone overhead."),
        (f"Reference run dev accuracy: cached {cached['best_eval']:.4f}, online {online['best_eval']:.4f}. "
        f"Best trial: {summary['best']['value']:.4f} {summary['best']['params']}."),
    ]
    if stacked:
        md += ["", (f"Stacked: {stacked['k']} trials in one pass took {stacked['stacked_seconds']} s against "
                   f"{stacked['separate_seconds']} s one after the other: **{stacked['speedup']}x**.")]
    if stacked_sweep_s is not None:
        md += ["", (f"The same {TRIALS}-trial sweep with `--stack {STACK}` (trials sharing a network shape train in one "
                   f"pass): {stacked_sweep_s:.0f} s, extraction included {extract_s + stacked_sweep_s:.0f} s: "
                   f"**{results['stacked_speedup_vs_online']}x** over online (goal: at least 8x). "
                   "Stacked groups share the reduction factor and kept layers of their first trial, so the search "
                   "explores those less widely than the unstacked sweep.")]
    write_results("sweep", results, "\n".join(md) + "\n", COMMAND)


if __name__ == "__main__":
    main()
