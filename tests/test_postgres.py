"""`lst sweep` on a real PostgreSQL server (Debian's binaries, started here as a non-root user on loopback):
two sweeps with their own --out folders (as on two machines) share one study; one is killed -9 mid-trial
and restarted. Exactly N trials finish, the killed one is retried with its settings, and each folder's
summary and best link are right. Skipped where PostgreSQL's server binaries are not installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")
pytest.importorskip("psycopg")
import pgserver

from featcache import ExtractConfig, extract
from sidetrain.search.sweep import SweepConfig, run_sweep

ROOT = Path(__file__).resolve().parents[1]
SPACE = "lr: {low: 1.0e-3, high: 1.0e-2, log: true}\nreduction_factor: [4, 8]\nbatch_size: 32\nepochs: 6\n"


@pytest.fixture(scope="module")
def pg_url():
    if pgserver.binaries() is None:
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed; .ci/run installs them")
    with pgserver.postgres() as url:
        yield url


@pytest.fixture(scope="module")
def store(tiny_bert, tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pg") / "store"
    extract(ExtractConfig(model=str(tiny_bert), dataset=str(tiny_dataset), out=str(out), splits=["train", "dev"],
                          max_length=16, store_dtype="fp32", device="cpu"))
    return out


def test_a_driver_is_installed_for_the_default_dialect(pg_url):
    """What a fresh install lacked: `postgresql://` (no +driver) must open."""
    from sidetrain.search.study import open_storage

    storage = open_storage(pg_url)
    assert optuna.create_study(storage=storage, study_name="driver").study_name == "driver"


def test_claims_of_one_study_are_serialised_across_connections(pg_url, tmp_path):
    """The advisory lock sweeps hold while claiming: a second holder (another machine) waits for the first."""
    import threading

    from sidetrain.search.study import study_lock

    cfgs = [SweepConfig(store="s", out=str(tmp_path / m), storage=pg_url, study_name="locked") for m in ("a", "b")]
    spans: list[tuple[float, float]] = []

    def hold(cfg: SweepConfig, entered: threading.Event) -> None:
        with study_lock(cfg):
            t0 = time.monotonic()
            entered.set()
            time.sleep(0.5)
            spans.append((t0, time.monotonic()))

    first, second = threading.Event(), threading.Event()
    a = threading.Thread(target=hold, args=(cfgs[0], first))
    a.start()
    assert first.wait(30)
    b = threading.Thread(target=hold, args=(cfgs[1], second))
    b.start()
    for t in (a, b):
        t.join(60)
    (_, a1), (b0, _) = sorted(spans)
    assert len(spans) == 2 and b0 >= a1  # never both inside


def test_two_machines_one_killed_share_a_postgres_study(pg_url, store, tmp_path):
    n, name = 4, "shared"
    (tmp_path / "space.yaml").write_text(SPACE)
    space = yaml.safe_load(SPACE)

    def sweep(machine: str) -> subprocess.Popen:
        log = (tmp_path / f"{machine}.log").open("a")
        return subprocess.Popen(
            [sys.executable, "-m", "cli", "sweep", str(store), "--out", str(tmp_path / machine), "--trials", str(n),
             "--space", str(tmp_path / "space.yaml"), "--storage", pg_url, "--study-name", name, "--no-prune",
             "--device", "cpu", "--threads", "1", "--stack", "1"],
            stdout=log, stderr=log, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})

    storage = optuna.storages.RDBStorage(pg_url)  # one engine for all the looks (each storage holds a pool)

    def trials(*states: str):
        study = optuna.load_study(study_name=name, storage=storage)
        return [t for t in study.get_trials() if not states or t.state.name in states]

    m1, m2 = sweep("m1"), sweep("m2")
    victim, deadline = None, time.time() + 300
    try:
        while victim is None and time.time() < deadline and m1.poll() is None:
            time.sleep(0.3)
            os.kill(m1.pid, signal.SIGSTOP)  # frozen while we look: a trial seen running is still running
            try:
                victim = next((t for t in trials("RUNNING") if t.user_attrs.get("pid") == m1.pid
                               and t.intermediate_values), None)
            except Exception:  # noqa: BLE001 - the study may not exist yet
                victim = None
            if victim is None:
                os.kill(m1.pid, signal.SIGCONT)
        assert victim is not None, f"m1 never mid-trial: {(tmp_path / 'm1.log').read_text()[-800:]}"
        os.kill(m1.pid, signal.SIGKILL)
        m1.wait()
        m1 = sweep("m1")  # the same command again on "machine 1"
        assert m1.wait(timeout=600) == 0, (tmp_path / "m1.log").read_text()[-800:]
        assert m2.wait(timeout=600) == 0, (tmp_path / "m2.log").read_text()[-800:]
    finally:
        for p in (m1, m2):
            p.kill()
            p.wait()

    complete = trials("COMPLETE")
    assert len(complete) == n and not trials("RUNNING", "WAITING", "PRUNED")  # exactly N, none over budget
    assert [t.number for t in trials("FAIL")] == [victim.number]
    retry = [t for t in complete if t.user_attrs.get("retry_of") == victim.number]
    assert len(retry) == 1 and retry[0].params == victim.params  # the killed settings ran again
    assert Path(victim.user_attrs["dir"]).name == "m1" and any(Path(t.user_attrs["dir"]).name == "m2"
                                                                for t in complete)  # both machines took trials
    for t in complete:  # each trial's run folder is on the machine that ran it, and only there
        where = [m for m in ("m1", "m2") if (tmp_path / m / "trials" / str(t.number) / "metrics.json").exists()]
        assert where == [Path(t.user_attrs["dir"]).name], t.number
    best = max(complete, key=lambda t: t.value)
    for machine in ("m1", "m2"):
        # the one that stopped first wrote its summary before the last trial: the same command refreshes it
        run_sweep(SweepConfig(store=str(store), out=str(tmp_path / machine), trials=n, space=space, prune=False,
                              storage=pg_url, study_name=name, device="cpu", threads=1, stack=1))
        summary = json.loads((tmp_path / machine / "summary.json").read_text())
        assert summary["finished"] == n and summary["counts"] == {"COMPLETE": n, "FAIL": 1}
        assert summary["best"]["number"] == best.number and summary["best"]["value"] == best.value
        link = tmp_path / machine / "best"
        if Path(best.user_attrs["dir"]).name == machine:
            assert link.resolve() == (tmp_path / machine / "trials" / str(best.number)).resolve()
        else:
            assert not link.exists()  # the best run is in the other machine's folder: no dangling link
    assert len(trials()) == n + 1  # the refreshing runs claimed nothing
