"""Results of a sweep: OUT/summary.json, OUT/summary.png, OUT/best, and the table `lst sweep` prints."""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from featcache.errors import LstError, expected

log = logging.getLogger(__name__)
logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font-cache chatter


def _trial_record(t) -> dict[str, Any]:
    a = t.user_attrs
    value = t.value if t.state.name == "COMPLETE" else None
    if t.state.name == "PRUNED" and t.intermediate_values:  # a pruned trial: its last reported score
        value = t.intermediate_values[max(t.intermediate_values)]
    # A failed (or killed, or running) trial has no score, whatever epochs it reported before it stopped.
    duration = (t.datetime_complete - t.datetime_start).total_seconds() \
        if t.datetime_complete and t.datetime_start else None
    return {"number": t.number, "state": t.state.name, "value": value, "params": t.params,
            "run": a.get("run"), "epochs_run": a.get("epochs_run"), "duration_s": duration,
            "worker": a.get("worker"), "host": a.get("host"), "dir": a.get("dir"), "retry_of": a.get("retry_of"),
            "splits": a.get("splits"), "error": a.get("error"),
            "intermediate": {int(k): v for k, v in sorted(t.intermediate_values.items())}}


def _importance(study) -> dict[str, float]:
    """Parameter importances (fANOVA) once there are enough complete trials; {} otherwise."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3 or len({k for t in complete for k in t.params}) < 1:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import optuna

            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except Exception as err:  # noqa: BLE001 - importances need varied trials; a summary without them is fine
        log.info("no parameter importances: %s", err)
        return {}


def summarize(study, metric: str) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = [_trial_record(t) for t in study.get_trials(deepcopy=False)]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = max(complete, key=lambda t: t["value"]) if complete else None
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return {"study": study.study_name, "metric": metric, "direction": "maximize", "counts": counts,
            "finished": len(finished), "best": best, "importance": _importance(study),
            "trial_seconds": sum(t["duration_s"] or 0 for t in trials), "trials": trials}


def link_best(out: Path, best: dict[str, Any] | None) -> Path | None:
    """OUT/best -> trials/<best> (a relative symlink; a copy where links are not possible)."""
    link = out / "best"
    if best is None or not best.get("run"):
        return None
    target = out / best["run"]
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    if not target.is_dir():  # run by a worker on another machine (journal storage): its folder is there
        log.info("the best trial (%s) ran on %s, in %s", best["run"], best.get("host", "another host"),
                 best.get("dir", "its own sweep folder"))
        return None
    try:
        os.symlink(best["run"], link, target_is_directory=True)
    except OSError:
        shutil.copytree(target, link)
    return link


def plot(summary: dict[str, Any], path: Path) -> Path | None:
    """Metric by trial (best so far as a line) and by the two most important parameters."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'lst[sweep]'): no %s", path.name)
        return None
    trials = [t for t in summary["trials"] if t["value"] is not None]
    top = list(summary["importance"])[:2] or sorted({k for t in trials for k in t["params"]})[:2]
    fig, axes = plt.subplots(1, 1 + len(top), figsize=(5 * (1 + len(top)), 4), squeeze=False)
    ax = axes[0][0]
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        pts = [(t["number"], t["value"]) for t in trials if t["state"] == state]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=state.lower())
    running, xs, ys = float("-inf"), [], []
    for t in sorted((t for t in trials if t["state"] == "COMPLETE"), key=lambda t: t["number"]):
        running = max(running, t["value"])
        xs.append(t["number"])
        ys.append(running)
    if xs:
        ax.step(xs, ys, where="post", color="black", label="best so far")
    ax.set(xlabel="trial", ylabel=summary["metric"], title=f"{summary['metric']} by trial")
    ax.legend()
    for ax, name in zip(axes[0][1:], top):
        pts = [(t["params"][name], t["value"], t["state"]) for t in trials if name in t["params"]]
        numeric = all(isinstance(p[0], (int, float)) for p in pts)
        labels = sorted({str(p[0]) for p in pts}) if not numeric else []
        for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
            sel = [(p[0] if numeric else labels.index(str(p[0])), p[1]) for p in pts if p[2] == state]
            if sel:
                ax.scatter(*zip(*sel), marker=marker)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        elif name == "lr":
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on a short log axis
        imp = summary["importance"].get(name)
        ax.set(xlabel=name, ylabel=summary["metric"],
               title=f"{name}" + (f" (importance {imp:.2f})" if imp is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results(study, out: Path, metric: str, wall_seconds: float | None = None) -> dict[str, Any]:
    summary = summarize(study, metric)
    summary["wall_seconds"] = wall_seconds
    link = link_best(out, summary["best"])
    summary["best_dir"] = str(link) if link else None
    png = plot(summary, out / "summary.png")
    summary["plot"] = str(png) if png else None
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def load_summary(out: str | Path) -> dict[str, Any]:
    path = Path(out) / "summary.json"
    if not path.is_file():
        raise LstError(expected("a sweep folder holding summary.json", f"'{out}'",
                                "Run `lst sweep STORE --out DIR` first, then `lst sweep DIR --report`."))
    return json.loads(path.read_text())


def results_table(summary: dict[str, Any], top: int = 10):
    """A rich table of the best trials (complete first, then pruned), for the CLI to print; then, up to `top`
    rows in all, the trials without a score (failed, or pruned before any evaluation): their state, no metric."""
    from rich.table import Table

    scored = sorted((t for t in summary["trials"] if t["value"] is not None),
                    key=lambda t: (t["state"] != "COMPLETE", -t["value"]))
    rows = (scored + [t for t in summary["trials"] if t["value"] is None and t["state"] in ("FAIL", "PRUNED")])[:top]
    params = sorted({k for t in rows for k in t["params"]})
    c = summary["counts"]
    table = Table(title=f"sweep '{summary['study']}': {c.get('COMPLETE', 0)} complete, {c.get('PRUNED', 0)} pruned, "
                        f"{c.get('FAIL', 0)} failed; best {top} by {summary['metric']}")
    for name in ["trial", summary["metric"], "state", *params, "epochs", "seconds"]:
        table.add_column(name, justify="left" if name in ("state", *params) else "right", no_wrap=True)
    best = (summary.get("best") or {}).get("number")
    for t in rows:
        score = "" if t["value"] is None else f"{t['value']:.4f}"
        cells = [f"{t['number']}{' *' if t['number'] == best else ''}", score, _state(t["state"])]
        cells += [_fmt(t["params"].get(p)) for p in params]
        cells += [str(t["epochs_run"] or ""), f"{t['duration_s']:.1f}" if t["duration_s"] else ""]
        table.add_row(*cells)
    return table


def _state(state: str) -> str:
    return "failed" if state == "FAIL" else state.lower()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)

