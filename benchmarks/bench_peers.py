"""lst against its peers on one backbone: full fine-tuning, LoRA (PEFT), LST online / from the store, a sweep, the probe.

    python benchmarks/bench_peers.py [--tasks banking77,mrpc] [--train N] [--model DIR] [--quick]
    python benchmarks/bench_peers.py --only lst_cached,lst_sweep,probe   # re-run some rows, keep the others

Same backbone (the bundled MiniLM-L6 unless --model names a local folder: nothing is downloaded), same
splits, same machine, one process per method, run one after the other:

  full          AutoModelForSequenceClassification, every weight trained (benchmarks/peers_finetune.py)
  lora_<lr>     PEFT LoRA r=8 on the attention's query/key/value projections, classification head trained,
                two learning rates (peers_finetune.py)
  lst_online    `lst train STORE --online`: the side network with the backbone live
  lst_cached    `lst train STORE`: the side network from the store (defaults: 10 epochs, r=8, fp16 store)
  lst_sweep     best of `lst sweep STORE --trials 16` (default space, default stacking and pruning)
  probe         `lst train STORE --head probe`
  equal budget  in the wall time of the best LoRA run: extraction plus the sweep's trials that finished
                within it (lst sweep has no time budget: counted from the trials' completion times in study.db)

Per method: the task's metric on dev (and test where the data has one), seconds per epoch, wall time to
the result (extraction included for every lst row, since each needs the store), the process's peak RssAnon
and RssFile (the parent samples /proc/<pid>/status of the child and its children every 20 ms), the peak above
the loaded state (peers: above the RSS when the model and tokenised data are loaded; lst: the training loop's
own peak above its start, metrics.json's peak_memory_bytes), trainable parameters.
Results: benchmarks/results/peers.json, peers.md, peers.png (metric against memory and against wall time).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, log, run_measured, setup_logging, write_results

HERE = Path(__file__).resolve().parent
GLUE = HERE.parents[1] / "shared" / "data" / "glue"
LST = str(Path(sys.executable).parent / "lst")
FINETUNE = str(HERE / "peers_finetune.py")
# GLUE folder per task; SST-2's 67k training rows are subsampled by default (a full LoRA epoch: ~20 min here)
GLUE_TASKS = {"sst2": "SST-2", "cola": "CoLA", "mrpc": "MRPC", "stsb": "STS-B", "rte": "RTE"}
DEFAULT_TRAIN_ROWS = {"sst2": 8000}
# GLUE files without a header row: their columns, named so that the subset written to --work has one
HEADERLESS = {"cola": ["source", "label", "original_label", "sentence"]}
METHODS = ["full", "lora_a", "lora_b", "lst_online", "lst_cached", "lst_sweep", "probe"]
LST_METHODS = {"lst_online", "lst_cached", "lst_sweep", "probe"}
MiB = 2 ** 20


def prepare_data(task: str, work: Path, train_rows: int, eval_rows: int) -> tuple[Path, str, dict[str, int]]:
    """The task's folder (or a seeded subset of it written to `work`), the --quoting to read it with, rows."""
    from featcache.bundled import bolt_dataset_path
    from featcache.text.sources import Quoting, load_dataset_path

    src, quoting = (bolt_dataset_path("banking"), "auto") if task == "banking77" else (GLUE / GLUE_TASKS[task], "none")
    data = load_dataset_path(src, Quoting(quoting), header=task not in HEADERLESS)
    for table in data.splits.values() if task in HEADERLESS else ():
        table.frame.columns = HEADERLESS[task]
    rows = {s: len(t.frame) for s, t in data.splits.items()}
    limits = {s: (train_rows if s == "train" else eval_rows) for s in rows}
    if task not in HEADERLESS and not any(0 < limits[s] < rows[s] for s in rows):
        return src, quoting, rows
    out = work / src.name  # keep the folder name: lst picks GLUE's metric by it
    out.mkdir(parents=True, exist_ok=True)
    for split, table in data.splits.items():
        frame = table.frame
        if 0 < limits[split] < len(frame):
            frame = frame.sample(limits[split], random_state=0)
        # standard CSV quoting: texts holding quotes, tabs or newlines read back exactly with --quoting csv
        frame.to_csv(out / f"{split}.tsv", sep="\t", index=False)
        rows[split] = len(frame)
    return out, "csv", rows


def _metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def _memory(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("peak_rss_anon_bytes", "peak_rss_file_bytes", "peak_rss_bytes", "rss_when_loaded_bytes")
    return {k: m[k] for k in keys}


def _check(m: dict[str, Any], what: str) -> None:
    if m["rc"] != 0:
        raise RuntimeError(f"{what} failed (exit {m['rc']}): {' '.join(map(str, m['cmd']))}\n{m['stderr_tail']}")


def run_peer(name: str, args, data: Path, quoting: str, metric: str, method: str, lr: float) -> dict[str, Any]:
    cmd = [sys.executable, FINETUNE, args.model, str(data), "--method", method, "--lr", str(lr),
           "--epochs", str(args.peer_epochs), "--quoting", quoting, "--metric", metric,
           "--lora-targets", args.lora_targets]
    log.info("%s: %s lr %g, %d epochs", name, method, lr, args.peer_epochs)
    m = run_measured(cmd)
    _check(m, name)
    r = json.loads(next(x for x in m["stdout"].splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    return {"method": name, "kind": "peer", "lr": lr, "epochs": r["epochs"], "splits": r["splits"],
            "per_epoch_eval": [h[f"eval_{metric}"] for h in r["history"]], "seconds_per_epoch": r["seconds_per_epoch"],
            "wall_seconds": m["wall_seconds"], **_memory(m),
            "peak_above_loaded_bytes": m["peak_rss_bytes"] - m["rss_when_loaded_bytes"],
            "trainable_parameters": r["trainable_parameters"], "total_parameters": r["total_parameters"],
            "lora": r["lora"], "command": " ".join(cmd[1:])}


def run_lst(name: str, work: Path, store: Path, extras: list[str], extract_seconds: float) -> dict[str, Any]:
    out = work / name
    cmd = [LST, "train", str(store), "--out", str(out), *extras]
    log.info("%s: lst train %s", name, " ".join(extras))
    m = run_measured(cmd)
    _check(m, name)
    s = _metrics(out)
    metric = s["metric"]
    return {"method": name, "kind": "lst", "epochs": len(s.get("history") or []) or None, "splits": s["splits"],
            "per_epoch_eval": [h.get(f"eval_{metric}") for h in s.get("history") or []],
            "seconds_per_epoch": s.get("seconds_per_epoch"), "train_seconds": s.get("train_seconds"),
            "process_seconds": m["wall_seconds"], "wall_seconds": extract_seconds + m["wall_seconds"], **_memory(m),
            "peak_above_loaded_bytes": s.get("peak_memory_bytes"), "trainable_parameters": s.get("trainable_parameters"),
            "command": "lst train STORE " + " ".join(extras)}


def run_sweep(work: Path, store: Path, trials: int, extract_seconds: float) -> dict[str, Any]:
    out = work / "lst_sweep"
    cmd = [LST, "sweep", str(store), "--out", str(out), "--trials", str(trials)]
    log.info("lst_sweep: %d trials", trials)
    started = time.time()
    m = run_measured(cmd)
    _check(m, "lst_sweep")
    summary = json.loads((out / "summary.json").read_text())
    best = summary["best"] or {}
    best_metrics = Path(best["dir"]) / (best.get("run") or "") / "metrics.json" if best.get("dir") else None
    trainable = json.loads(best_metrics.read_text()).get("trainable_parameters") \
        if best_metrics and best_metrics.exists() else None
    return {"method": "lst_sweep", "kind": "lst", "epochs": best.get("epochs_run"), "splits": best.get("splits") or {},
            "best_params": best.get("params"), "trials_finished": summary["finished"], "counts": summary["counts"],
            "seconds_per_epoch": None, "process_seconds": m["wall_seconds"],
            "wall_seconds": extract_seconds + m["wall_seconds"], **_memory(m), "peak_above_loaded_bytes": None,
            "trainable_parameters": trainable, "started_unix": started, "study_db": str(out / "study.db"),
            "command": f"lst sweep STORE --trials {trials}"}


def equal_budget(sweep: dict[str, Any], budget_seconds: float, extract_seconds: float, metric: str) -> dict[str, Any]:
    """The sweep's trials that finished within `budget_seconds` of wall time, extraction included."""
    import datetime as dt

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{sweep['study_db']}"
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    deadline = dt.datetime.fromtimestamp(sweep["started_unix"] + budget_seconds - extract_seconds)
    done = [t for t in study.get_trials(deepcopy=False)
            if t.state.name in ("COMPLETE", "PRUNED") and t.datetime_complete and t.datetime_complete <= deadline]
    complete = [t for t in done if t.state.name == "COMPLETE"]
    best = max(complete, key=lambda t: t.value, default=None)
    return {"budget_seconds": budget_seconds, "sweep_seconds_in_budget": budget_seconds - extract_seconds,
            "trials_finished": len(done), "trials_complete": len(complete),
            "best_splits": (best.user_attrs.get("splits") if best else None) or {},
            "best_eval": best.value if best else None, "best_params": best.params if best else None, "metric": metric}


def bench_task(task: str, args, work: Path) -> dict[str, Any]:
    from sidetrain.metrics import GLUE_METRICS

    data, quoting, rows = prepare_data(task, work, args.train or DEFAULT_TRAIN_ROWS.get(task, 0), args.eval_rows)
    regression = task == "stsb"
    metric = "pearson" if regression else GLUE_METRICS.get(task, "accuracy")
    log.info("== %s: %s rows, metric %s", task, rows, metric)
    store = work / "store.zarr"
    extract_cmd = [LST, "extract", args.model, str(data), "--out", str(store), "--max-length", "64",
                   "--quoting", quoting]
    want = set(args.only or METHODS)
    ex = None
    saved = work / "extract.json"
    if want & LST_METHODS and args.keep_store and saved.exists() and store.exists():
        ex = json.loads(saved.read_text())  # --keep-store: the store and its extraction record of an earlier run
        log.info("reusing %s (extracted in %.0f s)", store, ex["wall_seconds"])
    elif want & LST_METHODS:
        ex = run_measured(extract_cmd)
        _check(ex, "lst extract")
        saved.write_text(json.dumps({k: v for k, v in ex.items() if k not in ("stdout",)}))
    extract_seconds = ex["wall_seconds"] if ex else 0.0
    rows_out: dict[str, dict[str, Any]] = {}
    lst_epochs = ["--epochs", str(args.lst_epochs)]
    for method in METHODS:
        if method not in want:
            continue
        done = work / f"{method}.row.json"  # each finished row on disk: a stopped run keeps what it measured
        if args.keep_store and done.exists():
            rows_out[method] = json.loads(done.read_text())
            continue
        if method == "full":
            rows_out[method] = run_peer(method, args, data, quoting, metric, "full", args.full_lr)
        elif method in ("lora_a", "lora_b"):
            if importlib.util.find_spec("peft") is None:
                log.error("%s skipped: peft is not installed (`make bench` installs it: pyproject's bench extra)", method)
                continue
            lr = args.lora_lrs[0 if method == "lora_a" else 1]
            rows_out[method] = run_peer(method, args, data, quoting, metric, "lora", lr)
        elif method == "lst_online":
            rows_out[method] = run_lst(method, work, store, ["--online", "--epochs", str(args.online_epochs)],
                                       extract_seconds)
        elif method == "lst_cached":
            rows_out[method] = run_lst(method, work, store, lst_epochs, extract_seconds)
        elif method == "lst_sweep":
            rows_out[method] = run_sweep(work, store, args.sweep_trials, extract_seconds)
        elif method == "probe":
            rows_out[method] = run_lst(method, work, store, ["--head", "probe"], extract_seconds)
        if method in rows_out:
            done.write_text(json.dumps(rows_out[method]))
    result = {"task": task, "rows": rows, "metric": metric, "data": str(data),
              "extract": {"seconds": extract_seconds, **_memory(ex), "command": "lst extract MODEL DATA --max-length 64 "
                          f"--quoting {quoting}"} if ex else None, "methods": rows_out}
    add_equal_budget(result)
    return result


def add_equal_budget(result: dict[str, Any]) -> None:
    """The equal-budget row, where the task has a LoRA row, a sweep (with its study.db) and an extraction."""
    rows, metric = result["methods"], result["metric"]
    loras = [rows[k] for k in ("lora_a", "lora_b") if k in rows]
    if loras and "lst_sweep" in rows and result.get("extract") and Path(rows["lst_sweep"]["study_db"]).exists():
        best_lora = max(loras, key=lambda r: r["splits"][_eval_split(r)][metric])
        result["equal_budget"] = {"lora": best_lora["method"],
                                  **equal_budget(rows["lst_sweep"], best_lora["wall_seconds"],
                                                 result["extract"]["seconds"], metric)}


def _eval_split(row: dict[str, Any]) -> str:
    return next(s for s in ("dev", "validation", "valid", "val") if s in row["splits"])


def merge_previous(results: dict[str, Any], only: list[str] | None) -> dict[str, Any]:
    """Tasks not run now come from the last results/peers.json, and with --only so do the rows not re-run
    (marked with that run's date)."""
    path = RESULTS / "peers.json"
    if not path.exists():
        return results
    old = json.loads(path.read_text())
    for task, new in results["tasks"].items() if only else ():
        before = old.get("tasks", {}).get(task)
        if not before:
            continue
        for method, row in before["methods"].items():
            if method not in new["methods"]:
                new["methods"][method] = {**row, "from_earlier_run": row.get("from_earlier_run") or old["machine"]["date"]}
        new["methods"] = {m: new["methods"][m] for m in METHODS if m in new["methods"]}
        if "equal_budget" not in new and "equal_budget" in before:
            new["equal_budget"] = before["equal_budget"]
    for task, before in old.get("tasks", {}).items():
        if task not in results["tasks"]:
            results["tasks"][task] = {**before, "measured": before.get("measured") or old["machine"]["date"]}
    return results


LABELS = {"full": "full fine-tuning", "lst_online": "LST online", "lst_cached": "LST from the store",
          "lst_sweep": "LST, best of sweep", "probe": "probe (logistic regression)"}


def label(row: dict[str, Any]) -> str:
    if row["method"].startswith("lora"):
        return f"LoRA r={row['lora']['r']} lr {row['lr']:g}"
    if row["method"] == "full":
        return f"full fine-tuning lr {row['lr']:g}"
    return LABELS[row["method"]]


def _mib(v: int | None) -> str:
    return "—" if v is None else f"{v / MiB:,.0f}"


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec)


def markdown(results: dict[str, Any], args) -> str:
    lines = ["# lst against full fine-tuning and LoRA (PEFT), same backbone, same splits, one run", "",
             (f"Backbone: {results['backbone']}. Batch 32, max length 64, fp16 store (lst's default). Peers: "
              f"{args.peer_epochs} epochs, AdamW, linear warm-up (10%) and decay, dev scored each epoch, test at the "
              f"best dev epoch; LoRA r=8, alpha 16, dropout 0.1 on {args.lora_targets} (PEFT, task SEQ_CLS: the "
              "classification head trained too). lst: its defaults (r=8, all layers, lr 3e-3, 10 epochs); the sweep "
              f"{args.sweep_trials} trials of the default space with default stacking and pruning. One process per "
              "method, one after the other. Wall time to the result includes extraction for every lst row. Memory: "
              "the child's peak RssAnon and RssFile sampled every 20 ms from /proc; 'above loaded' is the peak "
              "RSS above the RSS once the model and data are loaded (peers) or above the training loop's start (lst, "
              "metrics.json)."), ""]
    for task, r in results["tasks"].items():
        metric = r["metric"]
        has_test = any("test" in row["splits"] for row in r["methods"].values())
        ex = r["extract"] or {"seconds": 0.0}
        lines += [f"## {task} ({metric}; rows {r['rows']})", "",
                  (f"Measured {r.get('measured', '?')}, load average {r.get('load_average_1m', '?')} at the end, "
                   f"`{r.get('command', '')}`. Extraction: {ex['seconds']:.0f} s, peak RssAnon "
                   f"{_fmt((ex.get('peak_rss_anon_bytes') or 0) / MiB or None, ',.0f')} MiB."
                   + (" These commands ran at the same time, to fit a deadline on a loaded machine: each row "
                      "still ran in its own process, but the processes slowed each other down (and other work ran "
                      "beside them)." if " + " in r.get("command", "") else "")),
                  "",
                  f"| method | epochs | dev {metric} |" + (f" test {metric} |" if has_test else "")
                  + " dev per epoch | s/epoch | wall to result (s) | peak RssAnon (MiB) | peak RssFile (MiB) "
                    "| above loaded (MiB) | trainable params |",
                  "|---|---:|---:|" + ("---:|" if has_test else "") + "---|---:|---:|---:|---:|---:|---:|"]
        for row in r["methods"].values():
            split = _eval_split(row) if row["splits"] else None
            dev = row["splits"][split][metric] if split else None
            test = row["splits"].get("test", {}).get(metric)
            curve = "/".join(f"{v:.3f}" for v in row.get("per_epoch_eval") or [] if v is not None)
            above = row.get("peak_above_loaded_bytes")
            name = label(row) + (" *" if row.get("from_earlier_run") else "") \
                + (" †" if row.get("stopped_at_deadline") else "")
            lines.append(f"| {name} | {row['epochs'] or '—'} | {_fmt(dev)} |" + (f" {_fmt(test)} |" if has_test else "")
                         + f" {curve or '—'} | {_fmt(row['seconds_per_epoch'], '.1f')} | {row['wall_seconds']:.0f} "
                         f"| {_mib(row['peak_rss_anon_bytes'])} | {_mib(row['peak_rss_file_bytes'])} "
                         f"| {_fmt(None if above is None else above / MiB, ',.0f')} "
                         f"| {_fmt(row['trainable_parameters'], ',')} |")
        sweep = r["methods"].get("lst_sweep")
        if sweep:
            lines += ["", (f"Sweep: {sweep['trials_finished']} trials finished ({sweep['counts']}); best trial's "
                          f"parameters {sweep['best_params']}.")]
        eb = r.get("equal_budget")
        if eb:
            test = eb["best_splits"].get("test", {}).get(metric)
            dev = eb["best_splits"].get(_eval_split({"splits": eb["best_splits"]}) if eb["best_splits"] else "", {})
            lines += ["", (f"**Equal budget** (the wall time of {label(r['methods'][eb['lora']])}, "
                           f"{eb['budget_seconds']:.0f} s): extraction + {eb['sweep_seconds_in_budget']:.0f} s of "
                           f"sweep finished {eb['trials_finished']} trials ({eb['trials_complete']} complete); best dev "
                           f"{metric} {_fmt(dev.get(metric) if dev else None)}"
                           + (f", test {_fmt(test)}" if test is not None else "")
                           + (f" ({eb['best_params']})" if eb["best_params"] else "") + ".")]
        lines.append("")
    if any(row.get("from_earlier_run") for r in results["tasks"].values() for row in r["methods"].values()):
        lines += [("\\* from an earlier run of this benchmark (its date in peers.json), kept when the others were "
                  "re-run with --only."), ""]
    stopped = [row for r in results["tasks"].values() for row in r["methods"].values() if row.get("stopped_at_deadline")]
    if stopped:
        lines += ["† stopped at a deadline before it finished: " + "; ".join(
            f"{label(row)}: {row['command']}" for row in stopped) + ".", ""]
    lines += [("Timings are from a shared 2-core machine (other work ran beside it: see the load average above); "
               "compare ratios measured in the same run."), ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4.2 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        r = results["tasks"][task]
        metric = r["metric"]
        for j, row in enumerate(r["methods"].values()):
            if not row["splits"]:
                continue
            score = row["splits"][_eval_split(row)][metric]
            kind = "lst" if row["kind"] == "lst" else "peer"
            style = {"marker": "o" if kind == "lst" else "s", "s": 60}
            points = [(axes[i][1], row["wall_seconds"])]
            if row["peak_rss_anon_bytes"]:
                points.append((axes[i][0], row["peak_rss_anon_bytes"] / MiB))
            for ax, x in points:
                ax.scatter([x], [score], **style)
                ax.annotate(label(row), (x, score), textcoords="offset points", xytext=(5, (-11, 4, 12)[j % 3]), fontsize=8)
        axes[i][0].set_xlabel("peak RssAnon (MiB)")
        axes[i][1].set_xlabel("wall time to the result (s, extraction included for lst)")
        axes[i][1].set_xscale("log")
        axes[i][1].xaxis.set_minor_formatter(NullFormatter())  # 2x10^1, 3x10^1, ... overlap on a narrow axis
        for ax in axes[i]:
            ax.set_ylabel(f"dev {metric}")
            ax.set_title(f"{task}: {results['backbone_short']}")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from featcache.bundled import minilm_path

    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tasks", default="banking77," + ",".join(GLUE_TASKS),
                   help="banking77 and GLUE tasks (sst2, cola, mrpc, stsb, rte; skipped when ../shared/data/glue is absent)")
    p.add_argument("--model", default=str(minilm_path()),
                   help="a local encoder folder (never downloaded): e.g. a base-size backbone where one is present")
    p.add_argument("--train", type=int, default=0, help="training rows per task, seeded subset (0: all; SST-2: 8000)")
    p.add_argument("--eval-rows", type=int, default=0, help="dev/test rows per task (0: all)")
    p.add_argument("--peer-epochs", type=int, default=10, help="epochs of full fine-tuning and LoRA (3 left both underfit on a 2,000-row banking77 subset: docs/benchmarks.md)")
    p.add_argument("--lst-epochs", type=int, default=10)
    p.add_argument("--online-epochs", type=int, default=0, help="epochs of the online row (0: as --lst-epochs)")
    p.add_argument("--full-lr", type=float, default=1e-4)
    p.add_argument("--lora-lrs", type=lambda s: [float(x) for x in s.split(",")], default=[2e-3, 5e-4])
    p.add_argument("--lora-targets", default="query,key,value")
    p.add_argument("--sweep-trials", type=int, default=16)
    p.add_argument("--only", type=lambda s: s.split(","), default=None, help=f"methods to run, of {','.join(METHODS)}")
    p.add_argument("--work", default=None, help="keep stores and runs here (default: a temporary folder)")
    p.add_argument("--keep-store", action="store_true",
                   help="with --work: reuse the store (and its extraction record) and the finished rows found there")
    p.add_argument("--name", default="peers", help="results/<name>.json, .md, .png")
    p.add_argument("--render", action="store_true",
                   help="run nothing: rewrite results/<name>.md and .png from results/<name>.json (and --merge)")
    p.add_argument("--merge", default="", help="with --render: also take the tasks of results/<these>.json, e.g. "
                                               "peers_glue (a run of other tasks under another --name)")
    p.add_argument("--quick", action="store_true", help="smoke run: banking77, 300 train / 200 eval rows, 1 epoch")
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.train, args.eval_rows = "banking77", args.train or 300, args.eval_rows or 200
        args.peer_epochs, args.lst_epochs, args.sweep_trials = 1, 1, 4
        args.name = args.name if args.name != "peers" else "peers_quick"
    args.online_epochs = args.online_epochs or args.lst_epochs
    if len(args.lora_lrs) != 2:
        p.error("--lora-lrs takes two learning rates, e.g. 2e-3,5e-4")
    if args.only and set(args.only) - set(METHODS):
        p.error(f"--only: unknown methods {sorted(set(args.only) - set(METHODS))} (have {', '.join(METHODS)})")
    if not Path(args.model).is_dir():
        p.error(f"--model: expected a local model folder, got '{args.model}' (the benchmark never downloads)")
    return args


def main(argv: list[str] | None = None) -> int:
    import tempfile

    setup_logging()
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.render:
        return render(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t != "banking77" and t not in GLUE_TASKS:
            log.error("unknown task %s (have banking77, %s)", t, ", ".join(GLUE_TASKS))
            return 2
    if not GLUE.is_dir() and any(t in GLUE_TASKS for t in tasks):
        log.info("no GLUE data at %s: GLUE tasks skipped", GLUE)
        tasks = [t for t in tasks if t not in GLUE_TASKS]
    results: dict[str, Any] = {
        **_backbone(args.model),
        "settings": {k: v for k, v in vars(args).items() if k not in ("work",)}, "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        root = Path(args.work) if args.work else Path(tmp)
        for task in tasks:
            work = root / task
            if work.exists() and args.work and not args.keep_store:
                import shutil

                shutil.rmtree(work)  # a fresh store and fresh runs each time: lst would resume otherwise
            work.mkdir(parents=True, exist_ok=True)
            import datetime as dt

            results["tasks"][task] = {**bench_task(task, args, work),
                                      "measured": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                      "load_average_1m": round(os.getloadavg()[0], 2),
                                      "command": "python benchmarks/bench_peers.py " + " ".join(sys.argv[1:])}
            # written after each task: a long run that is stopped keeps what it measured
            _write(results, args)
    return 0


def _backbone(model: str) -> dict[str, str]:
    from featcache.bundled import minilm_path

    cfg = json.loads((Path(model) / "config.json").read_text())
    name = "all-MiniLM-L6-v2 (bundled)" if Path(model) == Path(minilm_path()) else Path(model).name
    return {"backbone": f"{name} ({cfg.get('model_type')}, {cfg.get('num_hidden_layers')} layers, "
                        f"d={cfg.get('hidden_size')}) from {model}",
            "backbone_short": f"{cfg.get('model_type')} {cfg.get('num_hidden_layers')}L d={cfg.get('hidden_size')}"}


def rows_on_disk(work: Path, like: dict[str, Any]) -> dict[str, Any]:
    """The finished rows of a --work folder whose run was stopped before it wrote its results (WORK/TASK/*.row.json)."""
    tasks = {}
    for task_dir in sorted(p for p in work.iterdir() if p.is_dir()):
        rows = {f.name.removesuffix(".row.json"): json.loads(f.read_text()) for f in task_dir.glob("*.row.json")}
        if not rows:
            continue
        ex = json.loads((task_dir / "extract.json").read_text()) if (task_dir / "extract.json").exists() else None
        base = like["tasks"].get(task_dir.name, {})
        split_files = sorted((task_dir / "origin_data").glob("*.tsv")) if task_dir.name == "banking77" else []
        counted = {f.stem: sum(1 for _ in f.open()) - 1 for f in split_files}
        tasks[task_dir.name] = {"task": task_dir.name, "rows": base.get("rows") or counted or None, "metric": base.get("metric", "accuracy"),
                                "methods": rows, "command": f"(rows of the stopped run in {work})",
                                "extract": {"seconds": ex["wall_seconds"], **_memory(ex)} if ex else None}
    return {"tasks": tasks}


def render(args) -> int:
    path = RESULTS / f"{args.name}.json"
    results = json.loads(path.read_text()) if path.exists() else {"tasks": {}}
    for name in filter(None, args.merge.split(",")):
        other = json.loads((RESULTS / f"{name}.json").read_text()) if (RESULTS / f"{name}.json").exists() \
            else rows_on_disk(Path(name), results)
        for key in ("backbone", "backbone_short", "settings"):
            if other.get(key):
                results.setdefault(key, other[key])
        for task, r in other["tasks"].items():
            mine = results["tasks"].get(task)
            if mine is None:
                results["tasks"][task] = r
                continue
            # the same task from two runs (e.g. the peer rows and the lst rows run side by side): the rows of both
            mine["methods"] = {m: {**mine["methods"], **r["methods"]}[m] for m in METHODS
                               if m in mine["methods"] or m in r["methods"]}
            mine["extract"] = mine.get("extract") or r.get("extract")
            mine["command"] = " + ".join(filter(None, (mine.get("command"), r.get("command"))))
            mine["measured"] = " / ".join(filter(None, (mine.get("measured"), r.get("measured"))))
            mine["load_average_1m"] = " / ".join(str(x) for x in (mine.get("load_average_1m"),
                                                                 r.get("load_average_1m")) if x is not None)
            add_equal_budget(mine)
    results = {k: v for k, v in results.items() if k not in ("command", "machine")}
    if not results.get("settings"):  # only stopped runs' rows: the settings are this command's
        results["settings"] = {k: v for k, v in vars(args).items() if k not in ("work",)}
    if not results.get("backbone"):
        results.update(_backbone(args.model))
    write_results(args.name, results, markdown(results, argparse.Namespace(**results["settings"])),
                  "python benchmarks/bench_peers.py " + " ".join(sys.argv[1:]))
    plot(results, RESULTS / f"{args.name}.png")
    return 0


def _write(results: dict[str, Any], args) -> None:
    results = merge_previous(results, args.only) if args.name == "peers" else results
    command = "python benchmarks/bench_peers.py " + " ".join(sys.argv[1:])
    write_results(args.name, results, markdown(results, args), command)
    plot(results, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    sys.exit(main())
