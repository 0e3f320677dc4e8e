"""LST from the store against the linear-probe floor, on banking77 and the GLUE tasks present, several seeds.

    python benchmarks/bench_probe.py [--seeds 1] [--tasks banking77,CoLA,...] [--work DIR]

For each task: one fp16 store of the bundled MiniLM-L6 (all splits), the probe (`--head probe`:
logistic / least-squares regression on the mean-pooled last layer, L2 picked on dev) and LST with the
default options, one run per seed. GLUE has no labelled test split, so both pick on dev (the probe its
L2, LST its best epoch); LST's last-epoch dev score is reported too, which nothing was picked on.
One seed of every task takes about an hour on 2 CPU cores (`make bench` runs it so).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import GLUE, run_mode
from common import log, setup_logging, write_results

# task -> (data folder, GLUE's headline metric, max length, LST epochs, extraction options)
TASKS = {
    "banking77": (None, "accuracy", 64, 10, {}),
    "CoLA": (GLUE / "CoLA", "matthews", 64, 10, {"header": False, "text_column": "3", "label_column": "1"}),
    "MRPC": (GLUE / "MRPC", "f1", 128, 10, {}),
    "RTE": (GLUE / "RTE", "accuracy", 128, 10, {}),
    "STS-B": (GLUE / "STS-B", "pearson", 128, 10, {}),
    "SST-2": (GLUE / "SST-2", "accuracy", 64, 3, {}),  # 67k training sentences: 3 epochs
}


def store_for(task: str, data: Path | None, max_length: int, options: dict, work: Path) -> tuple[Path, float]:
    """The task's fp16 store in WORK (reused when a previous run completed it) and its extraction seconds."""
    from featcache import ExtractConfig, extract
    from featcache.bundled import bolt_dataset_path, minilm_path
    from featcache.errors import StoreError
    from featcache.reader import open_store

    out = work / f"{task}.zarr"
    t0 = time.perf_counter()
    try:
        open_store(out)  # a complete store from an earlier run (readers refuse incomplete ones)
        return out, float("nan")
    except StoreError as err:  # absent or incomplete: extract (an incomplete one resumes)
        log.info("%s: extracting (%s)", task, err)
    extract(ExtractConfig(model=str(minilm_path()), dataset=str(data or bolt_dataset_path("banking")), out=str(out),
                          max_length=max_length, device="cpu", **options))
    return out, time.perf_counter() - t0


def run_or_reuse(kw: dict) -> dict:
    """A run in a fresh process, or the metrics of the same run finished by an earlier call with this WORK."""
    done = Path(kw["out"]) / "metrics.json"
    if done.exists():
        log.info("reusing %s", done.parent)
        return json.loads(done.read_text())
    return run_mode(kw)


def bench_task(task: str, seeds: int, work: Path) -> dict:
    data, metric, max_length, epochs, options = TASKS[task]
    store, extract_seconds = store_for(task, data, max_length, options, work)
    common = {"store": str(store), "metric": metric, "device": "cpu"}
    log.info("%s: probe", task)
    probe = run_or_reuse({**common, "head": "probe", "out": str(work / f"{task}-probe")})
    lst = []
    while (work / f"{task}-lst-{seeds}" / "metrics.json").exists():  # more seeds finished by an earlier call
        seeds += 1
    for seed in range(seeds):
        log.info("%s: LST seed %d", task, seed)
        lst.append(run_or_reuse({**common, "epochs": epochs, "seed": seed, "out": str(work / f"{task}-lst-{seed}")}))
    splits = sorted(probe["splits"])
    return {"task": task, "metric": metric, "epochs": epochs, "max_length": max_length, "extract_seconds": extract_seconds,
            "probe": {s: probe["splits"][s][metric] for s in splits},
            "lst": [{s: r["splits"][s][metric] for s in splits} for r in lst],
            "lst_last_epoch_dev": [r["history"][-1][f"eval_{metric}"] for r in lst],
            "lst_seconds": [r["train_seconds"] for r in lst], "eval_split": probe["eval_split"]}


def _mean_sd(xs: list[float]) -> str:
    xs = [100 * x for x in xs]
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def markdown(results: list[dict]) -> str:
    lines = ["# LST from the store against the linear probe", "",
             ("Bundled MiniLM-L6, fp16 stores, LST with the default options (r=8, lr 3e-3, batch 32), mean ± sd over "
              "seeds in points; the probe is deterministic. dev: LST's best epoch and the probe's L2 were both picked "
              "on dev; 'last epoch' is LST's dev score after its final epoch (nothing picked)."), "",
             ("| task | metric | epochs | seeds | probe dev | LST dev (best epoch) | LST dev (last epoch) "
              "| LST - probe (last epoch) | probe test | LST test | s per LST run |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        dev = r["eval_split"]
        lst_dev = [x[dev] for x in r["lst"]]
        gap = statistics.mean(r["lst_last_epoch_dev"]) - r["probe"][dev]
        test = "test" in r["probe"]
        probe_test = f"{100 * r['probe']['test']:.1f}" if test else "-"
        lines.append(f"| {r['task']} | {r['metric']} | {r['epochs']} | {len(r['lst'])} | {100 * r['probe'][dev]:.1f} "
                     f"| {_mean_sd(lst_dev)} | {_mean_sd(r['lst_last_epoch_dev'])} | {100 * gap:+.1f} "
                     f"| {probe_test} | {_mean_sd([x['test'] for x in r['lst']]) if test else '-'} "
                     f"| {statistics.mean(r['lst_seconds']):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    setup_logging()
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=1, help="LST runs per task (a task with finished runs for more "
                                                          "seeds in --work reports those too)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, from " + ", ".join(TASKS))
    p.add_argument("--work", default=None, help="where stores and runs go (default: a temporary folder); "
                                                "finished stores and runs there are reused")
    args = p.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_probe_") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for task in tasks:
            data = TASKS[task][0]
            if data is not None and not data.is_dir():
                log.info("%s skipped (not found at %s)", task, data)
                continue
            results.append(bench_task(task, args.seeds, work))
            # partial results are worth keeping: a long run written task by task
            write_results("probe", {"args": vars(args), "results": results}, markdown(results),
                          "python benchmarks/bench_probe.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
