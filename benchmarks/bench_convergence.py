"""How fast LST converges from the store: which lever gets it to its 10-epoch score in LoRA's epoch budget.

    python benchmarks/bench_convergence.py [--tasks banking77,sst2] [--train 2000] [--epochs 3] [--seeds 0,1]

The issue: from an fp16 store LST needed 10 epochs where LoRA needed 2 (and was still 1.4 points behind).
Here every lever the paper and its code use is tried alone at `--epochs` epochs (LoRA's budget in
bench_peers.py), against lst's defaults at 3 and at 10 epochs, over several seeds, on banking77 and a GLUE
task (seeded training subsets; the full dev split, banking77's test split subsampled to --eval-rows):
  --lr 6e-3 / 1e-2, --warmup-steps 0, --init pruned, --reduction-factor 4, --layers 4-6 (the top three of
  MiniLM's six blocks), --pooling cls, --batch-size 16 (twice the steps), pruned init with lr 6e-3, --dropout 0,
  r 4 with batch 16, 5 epochs, and the
  best trial of bench_peers' sweep (results/peers.json) where one exists. All runs in this one process (the
  question is accuracy, not memory), one torch thread, each from the same store; the default space and
  defaults of sidetrain/config.py are not changed here.
Results: benchmarks/results/convergence.json and convergence.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import GLUE, GLUE_TASKS, prepare_data
from common import RESULTS, log, setup_logging, write_results

# name -> TrainConfig overrides (epochs come from --epochs unless a lever sets them)
LEVERS: dict[str, dict[str, Any]] = {
    "defaults, 10 epochs": {"epochs": 10},
    "defaults": {},
    "lr 6e-3": {"lr": 6e-3},
    "lr 1e-2": {"lr": 1e-2},
    "warmup 0": {"warmup_steps": 0},
    "init pruned": {"init": "pruned"},
    "r 4": {"reduction_factor": 4},
    "layers 4-6": {"layers": [4, 5, 6]},
    "pooling cls": {"pooling": "cls"},
    "batch 16": {"batch_size": 16},
    "init pruned + lr 6e-3": {"init": "pruned", "lr": 6e-3},
    "dropout 0": {"dropout": 0.0},
    "r 4 + batch 16": {"reduction_factor": 4, "batch_size": 16},
    "defaults, 5 epochs": {"epochs": 5},
}
SWEEP_KEYS = ("lr", "reduction_factor", "layers", "batch_size", "init", "pooling", "warmup_steps")


def sweep_lever() -> dict[str, Any] | None:
    """The best trial of the last bench_peers sweep on banking77 (its epochs replaced by --epochs)."""
    path = RESULTS / "peers.json"
    if not path.exists():
        return None
    row = json.loads(path.read_text()).get("tasks", {}).get("banking77", {}).get("methods", {}).get("lst_sweep")
    params = (row or {}).get("best_params") or {}
    lever = {k: v for k, v in params.items() if k in SWEEP_KEYS}
    if isinstance(lever.get("layers"), str):
        lever["layers"] = None if lever["layers"] == "all" else _layers(lever["layers"])
    return lever or None


def _layers(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in text.split(",")]


def run_task(task: str, args, work: Path, levers: dict[str, dict[str, Any]], on_lever=None) -> dict[str, Any]:
    from featcache import ExtractConfig, extract
    from featcache.bundled import minilm_path
    from sidetrain import TrainConfig, train

    data, quoting, rows = prepare_data(task, work, args.train, args.eval_rows)
    store = work / "store.zarr"
    t0 = time.perf_counter()
    extract(ExtractConfig(model=str(minilm_path()), dataset=str(data), out=str(store), max_length=64, quoting=quoting))
    extract_seconds = time.perf_counter() - t0
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, over in levers.items():
        for seed in args.seeds:
            kw = {"epochs": args.epochs, **over, "seed": seed, "device": "cpu"}
            log.info("%s: %s seed %d", task, name, seed)
            t0 = time.perf_counter()
            s = train(TrainConfig(store=str(store), out=str(work / f"{name.replace(' ', '_')}-{seed}"), **kw))
            metric = s["metric"]
            runs.setdefault(name, []).append({
                "seed": seed, "config": kw, "seconds": time.perf_counter() - t0,
                "splits": {k: v[metric] for k, v in s["splits"].items()},
                "per_epoch_eval": [h.get(f"eval_{metric}") for h in s["history"]],
                "trainable_parameters": s["trainable_parameters"]})
        if on_lever is not None:  # results written after every lever: a stopped run keeps what it measured
            on_lever({"task": task, "rows": rows, "metric": metric, "extract_seconds": extract_seconds, "runs": runs})
    return {"task": task, "rows": rows, "metric": metric, "extract_seconds": extract_seconds, "runs": runs}


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs)


def summarize(task: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {}
    base = _mean([r["splits"]["dev"] for r in task["runs"]["defaults"]]) if "defaults" in task["runs"] else None
    for name, runs in task["runs"].items():
        dev = [r["splits"]["dev"] for r in runs]
        out[name] = {"dev_mean": _mean(dev), "dev_min": min(dev), "dev_max": max(dev), "seeds": len(dev),
                     "delta_vs_defaults": None if base is None else _mean(dev) - base,
                     "seconds_mean": _mean([r["seconds"] for r in runs])}
        if all("test" in r["splits"] for r in runs):
            out[name]["test_mean"] = _mean([r["splits"]["test"] for r in runs])
    return out


def markdown(results: dict[str, Any], args) -> str:
    tasks = results["tasks"]
    lines = ["# Convergence of LST from the store: the levers at LoRA's epoch budget", "",
             (f"Bundled MiniLM-L6, fp16 store, max length 64; seeded training subsets of {args.train} rows; each lever "
              f"alone at {args.epochs} epochs (the peers' budget in bench_peers.py) unless it says otherwise; seeds "
              f"{args.seeds}; mean dev score over the seeds (min-max in brackets) and its difference from lst's "
              f"defaults at the same epochs. One torch thread; times are per run, noisy (shared machine)."), ""]
    head = "| lever |" + "".join(f" {t} dev {tasks[t]['metric']} | Δ |" for t in tasks) + " s/run |"
    lines += [head, "|---|" + "---:|---:|" * len(tasks) + "---:|"]
    names = list(next(iter(tasks.values()))["summary"]) if tasks else []
    for name in names:
        cells, secs = [], []
        for t in tasks.values():
            s = t["summary"].get(name)
            if s is None:
                cells.append(" — | — |")
                continue
            d = s["delta_vs_defaults"]
            cells.append(f" {s['dev_mean']:.4f} ({s['dev_min']:.3f}-{s['dev_max']:.3f}) | "
                         f"{'' if d is None else f'{d:+.4f}'} |")
            secs.append(s["seconds_mean"])
        lines.append(f"| {name} |" + "".join(cells) + f" {_mean(secs):.0f} |")
    if results.get("sweep_lever"):
        lines += ["", f"'best sweep trial' = {results['sweep_lever']} (bench_peers' banking77 sweep)."]
    wins = results.get("wins_on_every_task")
    if wins is not None:
        lines += ["", "Levers that beat the defaults at the same epochs on every task (mean over seeds): "
                  + (", ".join(f"{n} ({', '.join(f'{d:+.4f}' for d in ds)})" for n, ds in wins.items()) or "none")
                  + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    import torch

    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tasks", default="banking77,sst2")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--eval-rows", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    p.add_argument("--levers", default="", help="lever names to run, separated by semicolons (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="convergence", help="results/<name>.json and .md")
    p.add_argument("--keep", action="store_true", help="keep the other tasks found in results/<name>.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    levers = dict(LEVERS)
    sweep = sweep_lever()
    if sweep:
        levers["best sweep trial"] = sweep
    if args.levers:
        levers = {k: levers[k] for k in args.levers.split(";") if k in levers}  # in the order given
    tasks = [t for t in args.tasks.split(",") if t == "banking77" or (t in GLUE_TASKS and GLUE.is_dir())]
    results: dict[str, Any] = {"levers": levers, "sweep_lever": sweep, "settings": vars(args), "tasks": {}}
    path = RESULTS / f"{args.name}.json"
    if args.keep and path.exists():  # the tasks of an earlier run that this one does not run
        old = json.loads(path.read_text())
        results["tasks"] = {t: {**r, "command": r.get("command") or old["command"]}
                            for t, r in old["tasks"].items() if t not in tasks}
    command = "python benchmarks/bench_convergence.py " + " ".join(sys.argv[1:])

    def save(r: dict[str, Any]) -> None:
        r["summary"] = summarize(r)
        r["command"] = command
        results["tasks"][r["task"]] = r
        names = [n for n in LEVERS | levers if n not in ("defaults", "defaults, 10 epochs", "defaults, 5 epochs")]
        results["wins_on_every_task"] = {
            n: [t["summary"][n]["delta_vs_defaults"] for t in results["tasks"].values()]
            for n in names if all(n in t["summary"] and (t["summary"][n]["delta_vs_defaults"] or 0) > 0
                                  for t in results["tasks"].values())}
        write_results(args.name, results, markdown(results, args), command)

    with tempfile.TemporaryDirectory(prefix="bench_convergence_") as tmp:
        for task in tasks:
            work = Path(tmp) / task
            work.mkdir()
            save(run_task(task, args, work, levers, on_lever=save))
    return 0


if __name__ == "__main__":
    sys.exit(main())
