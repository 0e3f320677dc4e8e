"""Training memory by data policy: today's RAM preload vs the new default (the store memory-mapped) vs streaming.

    python benchmarks/bench_memory.py [--epochs 2] [--rounds 2] [--work DIR]

Bundled MiniLM-L6 over banking77 (train and dev), extracted once (fp16, max length 64, all 7 layers);
then one fresh process per policy and round, `lst train` with batch 32. The parent samples each child's
/proc/<pid>/status every 20 ms (RssAnon: anonymous memory, what the kernel cannot reclaim; RssFile:
file-backed pages, here mostly the memory-mapped store: clean page cache, shared, reclaimable). Also
from each run's metrics.json: seconds per epoch, data-wait seconds and the memory split.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, run_measured, setup_logging, write_results

THREADS = int(os.environ.get("LST_BENCH_THREADS", "0"))  # 0: torch's default
POLICIES = {  # name -> TrainConfig fields
    "old default: RAM preload (--preload)": {"preload": True},
    "new default (memory-mapped)": {},
    "stream (--no-preload)": {"preload": False},
}
RUNNER = """
import json, sys, torch
from sidetrain import TrainConfig, train
kw, threads = json.loads(sys.argv[1]), int(sys.argv[2])
if threads:
    torch.set_num_threads(threads)
s = train(TrainConfig(**kw))
print("RESULT " + json.dumps(s))
"""
MiB = 2**20


def extract_store(work: Path) -> tuple[Path, float]:
    from featcache import ExtractConfig, extract
    from featcache.bundled import bolt_dataset_path, minilm_path

    store = work / "banking77.zarr"
    t0 = time.perf_counter()
    if not (store / "zarr.json").exists():
        extract(ExtractConfig(model=str(minilm_path()), dataset=str(bolt_dataset_path("banking")), out=str(store),
                              splits=["train", "dev"], store_dtype="fp16", max_length=64, device="cpu"))
    return store, time.perf_counter() - t0


def store_facts(store: Path) -> dict:
    from featcache.reader import open_store

    s = open_store(store)
    disk = int(subprocess.run(["du", "-sb", str(store)], check=False, capture_output=True, text=True).stdout.split()[0])
    return {"layers": s.manifest["layers"], "store_dtype": s.manifest["store_dtype"], "disk_bytes": disk,
            "splits": {n: {"examples": len(s.split(n)), "tokens": s.split(n).n_tokens,
                           "hidden_bytes": s.split(n).nbytes()} for n in s.split_names}}


def run_policy(store: Path, work: Path, name: str, kw: dict, epochs: int, batch_size: int, r: int) -> dict:
    out = work / "runs" / f"round{r}-policy{list(POLICIES).index(name)}"
    cfg = {"store": str(store), "out": str(out), "epochs": epochs, "batch_size": batch_size, "device": "cpu",
           "resume": False, **kw}
    m = run_measured([sys.executable, "-c", RUNNER, json.dumps(cfg), str(THREADS)], interval=0.02)
    line = next((x for x in m["stdout"].splitlines() if x.startswith("RESULT ")), None)
    if m["rc"] or line is None:
        raise RuntimeError(f"{name} failed (exit {m['rc']}): {m['stderr_tail']}")
    s = json.loads(line[len("RESULT "):])
    row = {"policy": name, "round": r, "wall_seconds": m["wall_seconds"],
           "sampled_peak_rss_anon_bytes": m["peak_rss_anon_bytes"],
           "sampled_peak_rss_file_bytes": m["peak_rss_file_bytes"],
           "epoch_seconds": [h["seconds"] for h in s["history"]], "seconds_per_epoch": s["seconds_per_epoch"],
           "data_wait_seconds": s["data_wait_seconds"], "data_wait_fraction": s["data_wait_fraction"],
           "dev_accuracy": s["splits"]["dev"]["accuracy"], "memory": s["memory"],
           "peak_memory_bytes": s["peak_memory_bytes"], "peak_memory_kind": s["peak_memory_kind"]}
    log.info("%s round %d: %.1f s/epoch, wait %.2f s, peak RssAnon %.0f MiB, RssFile %.0f MiB", name, r,
             row["seconds_per_epoch"], row["data_wait_seconds"], row["sampled_peak_rss_anon_bytes"] / MiB,
             row["sampled_peak_rss_file_bytes"] / MiB)
    return row


def gather_seconds(store: Path, batch_size: int, epochs: int) -> dict:
    """The batch reads alone (no side network), per epoch: the store memory-mapped vs copied into RAM. The
    first epoch also verifies each shard's checksum (once per process) and, memory-mapped, faults its pages in."""
    import torch

    from featcache.reader import open_store
    from sidetrain.data import length_bucketed_batches

    torch.set_num_threads(1)
    out = {}
    for name, load in (("mmap", False), ("ram", True)):
        split = open_store(store).split("train")
        t0 = time.perf_counter()
        if load:
            split.load()
        out[f"{name}_load_seconds"] = time.perf_counter() - t0
        out[name] = []
        for epoch in range(epochs):
            batches = length_bucketed_batches(split.lengths, batch_size, 0, epoch)
            t0 = time.perf_counter()
            for b in batches:
                split.batch(b)
            out[name].append(time.perf_counter() - t0)
        del split
    log.info("batch reads per epoch: %s", out)
    return out


def median(rows: list[dict], key) -> float:
    return statistics.median(key(r) for r in rows)


def markdown(facts: dict, extract_seconds: float, rows: list[dict], epochs: int, batch_size: int,
             gather: dict) -> str:
    train = facts["splits"]["train"]
    extracted = f"{extract_seconds:.0f} s" if extract_seconds > 5 else "reused from an earlier call on the same --work"
    threads = THREADS or "torch's default"
    hidden = sum(s["hidden_bytes"] for s in facts["splits"].values())
    lines = ["# Training memory by data policy (bench_memory.py)", "",
             (f"Store: bundled MiniLM-L6 over banking77 train + dev ({train['examples']:,} + "
             f"{facts['splits']['dev']['examples']:,} examples, {train['tokens']:,} train tokens), layers "
             f"{facts['layers']}, {facts['store_dtype']}, max length 64: {facts['disk_bytes'] / MiB:,.0f} MiB on disk, "
             f"{hidden / MiB:,.0f} MiB of hidden states (extraction: {extracted}). "
             f"`lst train`, batch {batch_size}, {epochs} epochs, {threads} torch thread(s) per run, one fresh "
             "process per policy and round (alternating order); "
             "medians over rounds. Peaks: the parent sampling the child's /proc/<pid>/status every 20 ms."), "",
             ("| policy | wall s (whole run) | s/epoch | data wait s (2 epochs) | peak RssAnon MiB | peak RssFile MiB | data held MiB "
             "| model + grads + optimizer MiB | activations MiB | dev acc |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {name: [r for r in rows if r["policy"] == name] for name in POLICIES}
    for name, rs in by.items():
        mem = rs[0]["memory"]
        fixed = mem["model_bytes"] + mem["gradient_bytes"] + mem["optimizer_bytes"] + mem["best_weights_bytes"]
        lines.append(f"| {name} | {median(rs, lambda r: r['wall_seconds']):.0f} "
                     f"| {median(rs, lambda r: r['seconds_per_epoch']):.1f} "
                     f"| {median(rs, lambda r: r['data_wait_seconds']):.2f} "
                     f"| {median(rs, lambda r: r['sampled_peak_rss_anon_bytes']) / MiB:,.0f} "
                     f"| {median(rs, lambda r: r['sampled_peak_rss_file_bytes']) / MiB:,.0f} "
                     f"| {mem['data_held_bytes'] / MiB:,.0f} | {fixed / MiB:,.1f} "
                     f"| {median(rs, lambda r: r['memory']['activation_bytes']) / MiB:,.0f} "
                     f"| {rs[0]['dev_accuracy']:.3f} |")
    old, new = by["old default: RAM preload (--preload)"], by["new default (memory-mapped)"]
    ratio = {"peak RssAnon": median(new, lambda r: r["sampled_peak_rss_anon_bytes"]) /
             median(old, lambda r: r["sampled_peak_rss_anon_bytes"]),
             "s/epoch": median(new, lambda r: r["seconds_per_epoch"]) / median(old, lambda r: r["seconds_per_epoch"])}
    lines += ["", "New default / old default: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()) + ".", "",
              (f"The batch reads alone, in this process after the runs (train split, batch {batch_size}, one "
              "thread, no side network), seconds per epoch: memory-mapped "
              f"{', '.join(f'{x:.2f}' for x in gather['mmap'])}; copied into RAM "
              f"{', '.join(f'{x:.2f}' for x in gather['ram'])} after {gather['ram_load_seconds']:.1f} s of "
              "copying (the first epoch verifies every shard's checksum, and memory-mapped faults its pages in)."),
              "",
              "Per round:", "", ("| policy | round | s/epoch (each epoch) | data wait s | peak RssAnon MiB | "
              "peak RssFile MiB | process start RssAnon MiB |"), "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['round']} | {', '.join(f'{x:.1f}' for x in r['epoch_seconds'])} "
                     f"| {r['data_wait_seconds']:.2f} | {r['sampled_peak_rss_anon_bytes'] / MiB:,.0f} "
                     f"| {r['sampled_peak_rss_file_bytes'] / MiB:,.0f} "
                     f"| {r['memory']['process_start_rss_anon_bytes'] / MiB:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    setup_logging()
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="Keep the store here (reused when it exists).")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="lst-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    store, extract_seconds = extract_store(work)
    facts = store_facts(store)
    rows = []
    for r in range(a.rounds):
        names = list(POLICIES) if r % 2 == 0 else list(reversed(POLICIES))  # alternate the order: load drifts
        rows += [run_policy(store, work, n, POLICIES[n], a.epochs, a.batch_size, r) for n in names]
    gather = gather_seconds(store, a.batch_size, a.epochs)
    command = f"LST_BENCH_THREADS={THREADS} python benchmarks/bench_memory.py --epochs {a.epochs} " \
              f"--batch-size {a.batch_size} --rounds {a.rounds}"
    write_results("memory", {"store": facts, "extract_seconds": extract_seconds, "runs": rows,
                             "batch_read_seconds": gather},
                  markdown(facts, extract_seconds, rows, a.epochs, a.batch_size, gather), command)


if __name__ == "__main__":
    main()
