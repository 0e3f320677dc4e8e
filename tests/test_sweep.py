"""`lst sweep`: a study on a tiny store completes, resumes after a real kill -9, shares work between two
worker processes without losing or duplicating trials, and refuses bad input with one-line errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from featcache import ExtractConfig, extract

optuna = pytest.importorskip("optuna")

from sidetrain.search.space import SpaceError, parse_space, resolve_space
from sidetrain.search.sweep import SweepConfig, run_sweep

runner = CliRunner()
CPU = ("--device", "cpu", "--threads", 1, "--stack", 1)  # one thread: a busy shared CPU makes torch's thread pool spin;
# --stack 1: these tests are about one trial at a time (stacked sweeps: tests/kinds/encoder/test_encoder_stacked.py)
FAST = "lr: {low: 1.0e-3, high: 1.0e-2, log: true}\nreduction_factor: [4, 8]\nbatch_size: 32\nepochs: 2\n"


@pytest.fixture(scope="module")
def store(tiny_bert, tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "store"
    extract(ExtractConfig(model=str(tiny_bert), dataset=str(tiny_dataset), out=str(out), splits=["train", "dev"],
                          max_length=16, store_dtype="fp32", device="cpu"))
    return out


def space_file(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def trials_of(out: Path, *states: str):
    study = optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")
    return [t for t in study.get_trials() if not states or t.state.name in states]


def test_four_trials_write_summary_best_and_resume(store, tmp_path):
    out = tmp_path / "sw"
    r = invoke("sweep", store, "--out", out, "--trials", 4, "--space", space_file(tmp_path, FAST), *CPU)
    assert r.exit_code == 0, r.output
    assert "best 10 by accuracy" in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] == 4 and len(summary["trials"]) == 4
    assert (out / "summary.png").stat().st_size > 1000
    best = summary["best"]
    assert best["value"] == max(t["value"] for t in summary["trials"] if t["state"] == "COMPLETE")
    assert (out / "best").resolve() == (out / "trials" / str(best["number"])).resolve()
    assert {"config.json", "metrics.json", "model.safetensors"} <= {p.name for p in (out / "best").iterdir()}
    run_cfg = json.loads((out / "best" / "config.json").read_text())
    assert run_cfg["reduction_factor"] == best["params"]["reduction_factor"] and run_cfg["epochs"] == 2
    r = invoke("predict", out / "best", "--text", "card payment refund", "--device", "cpu")
    assert r.exit_code == 0 and "class_" in r.output, r.output  # the best run is a usable run folder
    for t in trials_of(out):  # the study alone is enough to compare trials
        assert t.user_attrs["run"] == f"trials/{t.number}" and "dev" in t.user_attrs["splits"]
    # the same command resumes (nothing to do); a larger budget adds exactly the missing trial
    assert invoke("sweep", store, "--out", out, "--trials", 4, "--space", tmp_path / "space.yaml", *CPU).exit_code == 0
    assert len(trials_of(out)) == 4
    r = invoke("sweep", store, "--out", out, "--trials", 5, "--space", tmp_path / "space.yaml", *CPU)
    assert r.exit_code == 0, r.output
    assert len(trials_of(out, "COMPLETE", "PRUNED")) == 5
    r = invoke("sweep", out, "--report")
    best = json.loads((out / "summary.json").read_text())["best"]
    assert r.exit_code == 0 and f"best: trial {best['number']}" in r.output, r.output
    changed = space_file(tmp_path, FAST.replace("epochs: 2", "epochs: 3"), "changed.yaml")
    r = invoke("sweep", store, "--out", out, "--trials", 6, "--space", changed, *CPU)
    assert r.exit_code == 1 and "same space" in r.output and "'epochs'" in r.output and "'lr'" not in r.output


def test_killed_trial_is_retried_not_lost(store, tmp_path):
    out, n = tmp_path / "sw", 3
    space = space_file(tmp_path, FAST.replace("epochs: 2", "epochs: 8"))
    cmd = [sys.executable, "-m", "cli", "sweep", str(store), "--out", str(out), "--trials", str(n), "--space",
           str(space), "--no-prune", *map(str, CPU)]
    sweep_log = (tmp_path / "sweep.log").open("w")
    proc = subprocess.Popen(cmd, stdout=sweep_log, stderr=sweep_log)
    victim, deadline = None, time.time() + 300  # generous: a busy shared CPU slows the start-up
    try:
        while victim is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            # sweep.json is written once the study exists: reading study.db before would race the sweep
            # creating it (open_storage retries that race; this test is about the kill, not the race)
            if not (out / "sweep.json").exists():
                continue
            os.kill(proc.pid, signal.SIGSTOP)  # frozen while we look: the trial seen running is still running
            try:
                with contextlib.suppress(Exception):  # the sweep was stopped mid-write (database locked)
                    # mid-trial: RUNNING with at least one epoch reported
                    victim = next((t for t in trials_of(out, "RUNNING") if t.intermediate_values), None)
            finally:
                if victim is None:
                    os.kill(proc.pid, signal.SIGCONT)
        assert victim is not None, f"never mid-trial (exit {proc.poll()}): {(tmp_path / 'sweep.log').read_text()[-800:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        sweep_log.close()
    assert [t.number for t in trials_of(out, "RUNNING")] == [victim.number]  # killed mid-trial, left RUNNING
    run_sweep(SweepConfig(store=str(store), out=str(out), trials=n, space={"epochs": 8, **_fast()}, prune=False,
                          device="cpu", threads=1))
    complete = trials_of(out, "COMPLETE")
    assert len(complete) == n and not trials_of(out, "RUNNING", "WAITING")
    assert [t.number for t in trials_of(out, "FAIL")] == [victim.number]
    retry = [t for t in complete if t.user_attrs.get("retry_of") == victim.number]
    assert len(retry) == 1 and retry[0].params == victim.params  # the killed settings ran again


RACE = """
import sys, time
import optuna
from sidetrain.search.study import open_storage
start = float(sys.argv[2])
while time.time() < start:
    pass
open_storage(sys.argv[1])
"""


def test_opening_a_new_storage_at_once_from_several_processes(tmp_path):
    """Each process creates the tables of a new study.db; the losers of that race retry (it used to end the
    sweep with 'table studies already exists' or a UNIQUE constraint on alembic_version)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for k in range(2):  # without the retry, 2 rounds of 4 openers failed 2 runs in 2
        url, start = f"sqlite:///{tmp_path / f'study{k}.db'}", time.time() + 4
        procs = [subprocess.Popen([sys.executable, "-c", RACE, url, str(start)], env=env, stderr=subprocess.PIPE,
                                  text=True) for _ in range(4)]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), [e.strip().splitlines()[-1] for e in errors if e.strip()]


def _fast() -> dict:
    import yaml

    return {k: v for k, v in yaml.safe_load(FAST).items() if k != "epochs"}


def test_two_workers_share_one_study(store, tmp_path):
    out, n = tmp_path / "sw", 4
    summary = run_sweep(SweepConfig(store=str(store), out=str(out), trials=n, workers=2, prune=False,
                                    space={**_fast(), "epochs": 3}, device="cpu", threads=1))
    trials = trials_of(out)
    assert summary["finished"] == n
    assert sorted(t.number for t in trials) == list(range(n))  # nothing lost, nothing run twice
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers took trials
    for t in trials:
        assert (out / "trials" / str(t.number) / "metrics.json").exists()


@pytest.mark.parametrize("text, fragments", [
    ("learning_rate: [0.01]\n", ["learning_rate", "'lr'", "reduction_factor"]),
    ("lr: {low: 0.1, high: 0.001}\n", ["empty range", "lr"]),
    ("batch_size: []\n", ["empty list", "batch_size"]),
    ("reduction_factor: [5]\n", ["reduction factors", "[5]"]),
])
def test_bad_space_file(store, tmp_path, text, fragments):
    r = invoke("sweep", store, "--out", tmp_path / "sw", "--space", space_file(tmp_path, text))
    assert r.exit_code == 1 and "Traceback" not in r.output and "Error:" in r.output
    for f in fragments:
        assert f in r.output.replace("\n", ""), r.output
    assert not (tmp_path / "sw").exists()  # refused before anything was created


@pytest.mark.parametrize("url", ["sqlite:////nonexistent-dir/x/study.db", "journal:///nonexistent-dir/x/s.log",
                                 "postgresql://lst:secret@127.0.0.1:1/none"])
def test_unreachable_storage(store, tmp_path, url):
    r = invoke("sweep", store, "--out", tmp_path / "sw", "--storage", url)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "reachable Optuna storage" in r.output.replace("\n", " ") and "secret" not in r.output


def test_space_parsing_and_json(store):
    from featcache import open_store

    space = parse_space({"lr": {"low": "1e-4", "high": 0.1, "log": True}, "epochs": {"low": 2, "high": 4},
                         "layers": ["all", "2"], "seed": 3})
    assert (space["lr"].kind, space["lr"].low, space["epochs"].kind, space["seed"].value) == ("float", 1e-4, "int", 3)
    with pytest.raises(SpaceError, match="stored blocks"):
        resolve_space(open_store(store).manifest, {"layers": ["7"]})
    with pytest.raises(SpaceError, match="integer"):
        parse_space({"epochs": {"low": 1.5, "high": 3}})


def test_stacked_members_match_separate_runs(store, tmp_path):
    """K networks in one vmapped pass train exactly as K separate runs (dropout off: no random masks)."""
    import dataclasses

    import torch

    from sidetrain import TrainConfig, train
    from sidetrain.search.stacked import train_stacked

    kw = {"store": str(store), "device": "cpu", "epochs": 2, "batch_size": 32, "reduction_factor": 4, "dropout": 0.0}
    cfgs = [TrainConfig(out=str(tmp_path / f"sep{i}"), lr=lr, **kw) for i, lr in enumerate((1e-3, 5e-3))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        separate = [train(c) for c in cfgs]
        stacked = train_stacked([dataclasses.replace(c, out=str(tmp_path / f"stk{i}")) for i, c in enumerate(cfgs)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(separate, stacked):
        assert [h["train_loss"] for h in b["history"]] == pytest.approx([h["train_loss"] for h in a["history"]],
                                                                        rel=1e-4)
        assert b["best_eval"] == a["best_eval"] and b["stacked_with"] == 2
    assert separate[0]["history"][-1]["train_loss"] != separate[1]["history"][-1]["train_loss"]  # lr per member
    assert {"config.json", "metrics.json", "model.safetensors"} <= {p.name for p in (tmp_path / "stk1").iterdir()}


def test_seeded_sampler_repeats_and_resumes_with_new_draws(store, tmp_path):
    space = {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "epochs": 1, "batch_size": 32}
    lrs = []
    for name in ("a", "b"):
        run_sweep(SweepConfig(store=str(store), out=str(tmp_path / name), trials=2, space=space, device="cpu",
                              threads=1, seed=7, prune=False))
        lrs.append([t.params["lr"] for t in trials_of(tmp_path / name)])
    assert lrs[0] == lrs[1] and lrs[0][0] != lrs[0][1]  # same seed, same draws
    run_sweep(SweepConfig(store=str(store), out=str(tmp_path / "a"), trials=3, space=space, device="cpu",
                          threads=1, seed=7, prune=False))
    resumed = [t.params["lr"] for t in trials_of(tmp_path / "a")]
    assert resumed[:2] == lrs[0] and resumed[2] not in lrs[0]  # a resumed study does not redraw trial 0


def test_two_machines_share_a_journal_file(store, tmp_path):
    """Two `lst sweep` commands with their own folders (as on two machines) join one journal-file study."""
    journal, n = tmp_path / "shared" / "study.log", 4
    journal.parent.mkdir()
    space = space_file(tmp_path, FAST)
    procs, logs = [], []
    for machine in ("m1", "m2"):
        logs.append((tmp_path / f"{machine}.log").open("w"))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cli", "sweep", str(store), "--out", str(tmp_path / machine), "--trials", str(n),
             "--space", str(space), "--storage", f"journal://{journal}", "--study-name", "shared", "--no-prune",
             *map(str, CPU)], stdout=logs[-1], stderr=logs[-1]))
    for p, f in zip(procs, logs):
        p.wait(timeout=600)
        f.close()
    assert [p.returncode for p in procs] == [0, 0], (tmp_path / "m2.log").read_text()[-800:]
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    trials = optuna.load_study(study_name="shared", storage=JournalStorage(JournalFileBackend(str(journal)))).get_trials()
    # without a shared folder the claim lock is per machine: at most one trial per extra machine over budget
    assert n <= len(trials) <= n + 1 and all(t.state.name == "COMPLETE" for t in trials)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    for t in trials:  # each trial's run folder is on the machine that ran it, and only there
        where = [m for m in ("m1", "m2") if (tmp_path / m / "trials" / str(t.number) / "metrics.json").exists()]
        assert where == [Path(t.user_attrs["dir"]).name]
    best = json.loads((tmp_path / "m1" / "summary.json").read_text())["best"]
    assert (tmp_path / "m1" / "best").exists() == (Path(best["dir"]).name == "m1")  # no dangling link


def test_failed_and_unscored_trials_show_their_state_and_no_metric():
    from optuna.trial import TrialState
    from rich.console import Console

    from sidetrain.search.report import results_table, summarize

    study = optuna.create_study(direction="maximize")
    done = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)})
    study.tell(done, 0.5)
    failed = study.ask()  # reported an epoch (0.9), then crashed: not a 0.9 trial
    failed.report(0.9, 1)
    failed.set_user_attr("error", "RuntimeError: boom")
    study.tell(failed, state=TrialState.FAIL)
    study.tell(study.ask(), state=TrialState.PRUNED)  # pruned before any evaluation
    pruned = study.ask()
    pruned.report(0.25, 1)
    study.tell(pruned, state=TrialState.PRUNED)
    summary = summarize(study, "accuracy")
    values = {t["number"]: (t["state"], t["value"]) for t in summary["trials"]}
    assert values == {0: ("COMPLETE", 0.5), 1: ("FAIL", None), 2: ("PRUNED", None), 3: ("PRUNED", 0.25)}
    assert summary["best"]["number"] == 0
    console = Console(record=True, width=200)
    console.print(results_table(summary))
    rows = {}
    for line in console.export_text().splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0].split(" ")[0].isdigit():
            rows[int(cells[0].split(" ")[0])] = cells[:3]  # trial, accuracy, state
    assert rows == {0: ["0 *", "0.5000", "complete"], 3: ["3", "0.2500", "pruned"],
                    1: ["1", "", "failed"], 2: ["2", "", "pruned"]}  # failed / unscored: their state, no accuracy
