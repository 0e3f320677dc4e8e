"""Accuracy levers of the side network, measured against the probe and the LoRA peers, over seeds.

    python benchmarks/bench_levers.py --stores banking77=W/banking77/banking77/store.zarr,sst2=... \
        --levers "lst=;last=--top last;layers=--top layers" --seeds 0,1,2 --work /tmp/levers

Each lever is a set of `lst train` flags (added to lst's defaults); each runs once per seed per store, one
process at a time, and a finished run (its metrics.json) is read back instead of run again. The probe
(`--head probe`, deterministic) runs once per store. Selection is on dev, as `lst train` does it; test is
reported where the store has one. The stores are those `benchmarks/bench_peers.py --keep-store --work W`
writes; the LoRA rows of results/peers.json are shown beside them, with a line saying whether they compare (lst's
seed-0 run here reproduces peers.json's LST row exactly only on the same rows and code).
Results: benchmarks/results/<name>.json and .md (mean and standard deviation over the seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, log, setup_logging, write_results

LST = str(Path(sys.executable).parent / "lst")
PEER_ROWS = {"lora_a": "LoRA r=8 (lr a)", "lora_b": "LoRA r=8 (lr b)", "full": "full fine-tuning"}


def run(store: str, out: Path, flags: list[str]) -> dict[str, Any]:
    """metrics.json of `lst train STORE --out OUT FLAGS`, run unless it already finished there."""
    metrics = out / "metrics.json"
    if not metrics.exists():
        t0 = time.perf_counter()
        cmd = [LST, "train", store, "--out", str(out), *flags]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        log.info("%s: %.0f s", out, time.perf_counter() - t0)
    return json.loads(metrics.read_text())


def scores(summary: dict[str, Any]) -> dict[str, float]:
    metric = summary["metric"]
    return {split: values[metric] for split, values in summary["splits"].items()}


def peer_scores(task: str) -> dict[str, dict[str, float]]:
    """The peers' rows of results/peers.json for this task (same subsets), if measured."""
    path = RESULTS / "peers.json"
    tasks = json.loads(path.read_text())["tasks"] if path.exists() else {}
    methods = tasks.get(task, {}).get("methods", {})
    out = {}
    if "lst_cached" in methods and methods["lst_cached"].get("splits"):  # says whether the rows compare
        out["LST defaults in results/peers.json"] = {s: v[tasks[task]["metric"]]
                                                     for s, v in methods["lst_cached"]["splits"].items()}
    for key, label in PEER_ROWS.items():
        if key in methods and methods[key].get("splits"):
            metric = tasks[task]["metric"]
            lr = methods[key].get("lr")
            out[f"{label.replace('(lr a)', f'lr {lr}').replace('(lr b)', f'lr {lr}')}"] = {
                s: v[metric] for s, v in methods[key]["splits"].items()}
    return out


def summarise(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Side-network levers against the probe and LoRA (dev selection, mean ± std over seeds)", "",
             f"Seeds {results['seeds']}; every lever adds its flags to `lst train`'s defaults.", ""]
    for task, t in results["tasks"].items():
        splits = t["splits"]
        lines += [f"## {task} ({t['metric']})", "",
                  "| method | " + " | ".join(f"{s} {t['metric']}" for s in splits) + " | s/run |",
                  "|---|" + "---:|" * (len(splits) + 1)]
        for lever, row in t["levers"].items():
            cells = [f"{row[s]['mean']:.4f} ± {row[s]['std']:.4f}" for s in splits]
            lines.append(f"| {lever} (`{results['levers'][lever] or 'defaults'}`) | " + " | ".join(cells) +
                         f" | {row['seconds']:.0f} |")
        lines.append("| probe | " + " | ".join(f"{t['probe'].get(s, float('nan')):.4f}" for s in splits) + " | |")
        ours, theirs = t["levers"].get("lst", {}).get("runs", [{}])[0], t["peers"].get("LST defaults in results/peers.json")
        if theirs is not None:  # lst's seed 0 reproduces the peers' LST row exactly when data and code are the same
            same = all(abs(ours.get(s, -1) - v) < 1e-9 for s, v in theirs.items())
            lines.append(f"| _peer rows {'comparable' if same else 'NOT comparable'}: lst seed 0 here "
                         f"{ours} vs peers.json's LST row {theirs}_ | " + " | ".join("" for _ in splits) + " | |")
        for name, peer in t["peers"].items():
            lines.append(f"| {name} (results/peers.json, 1 seed) | " +
                         " | ".join(f"{peer[s]:.4f}" if s in peer else "—" for s in splits) + " | |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stores", required=True, help="task=STORE,... (bench_peers --keep-store stores)")
    p.add_argument("--levers", default="lst=", help="name=flags;... (flags added to lst train's defaults)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--work", required=True, help="run folders (finished runs are read back)")
    p.add_argument("--name", default="levers", help="results/<name>.json and .md")
    args = p.parse_args()
    setup_logging()
    stores = dict(item.split("=", 1) for item in args.stores.split(","))
    levers = {k: v.split() for k, v in (item.split("=", 1) for item in args.levers.split(";") if item)}
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, Any] = {"command": "python benchmarks/bench_levers.py " + " ".join(
        f"{a} '{v}'" if " " in v or ";" in v else f"{a} {v}" for a, v in zip(sys.argv[1::2], sys.argv[2::2])),
        "levers": {k: " ".join(v) for k, v in levers.items()}, "seeds": seeds, "tasks": {}}
    work = Path(args.work)
    for task, store in stores.items():
        probe = run(store, work / task / "probe", ["--head", "probe"])
        splits = [s for s in probe["splits"]]
        entry: dict[str, Any] = {"metric": probe["metric"], "splits": splits, "probe": scores(probe),
                                 "peers": peer_scores(task), "levers": {}}
        for lever, flags in levers.items():
            runs = [run(store, work / task / lever / f"seed{s}", [*flags, "--seed", str(s)]) for s in seeds]
            row = {s: summarise([scores(r)[s] for r in runs]) for s in splits}
            row["seconds"] = statistics.fmean(r["train_seconds"] for r in runs)
            row["runs"] = [scores(r) for r in runs]
            entry["levers"][lever] = row
        results["tasks"][task] = entry
        write_results(args.name, results, markdown(results), results["command"])  # after each task: partial runs count


if __name__ == "__main__":
    main()
