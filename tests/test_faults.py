"""Fault injection: `kill -9` of real `lst` processes at seeded random instants of their work, then the
same command again, compared with an uninterrupted run. Each kill waits for a random amount of real
progress (shards written, epochs checkpointed, bytes copied) so it lands mid-work, not at start-up.

LST_FAULT_ROUNDS=N repeats each case with N different instants (default 1 in the suite).
`lst sweep` is killed mid-trial in tests/test_sweep.py::test_killed_trial_is_retried_not_lost.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from featcache.hdf5 import export_hdf5

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = int(os.environ.get("LST_FAULT_ROUNDS", "1"))
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")


def lst(*args) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), *map(str, args)]


def run(*args) -> None:
    proc = subprocess.run(lst(*args), env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]


def kill_when(cmd: list[str], ready: Callable[[], bool], delay: float, timeout: float = 240) -> str:
    """Start `cmd`, wait until `ready()` (real progress), then `delay` seconds more, then SIGKILL it.
    Returns where the kill landed ('mid-work', or 'after exit' when it finished first)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    return "mid-work" if proc.returncode == -signal.SIGKILL else "after exit"


def arrays(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {p: a[:] for p, a in group.members(max_depth=None) if isinstance(a, zarr.Array)}


def assert_same_store(a, b) -> None:
    x, y = arrays(a), arrays(b)
    assert sorted(x) == sorted(y)
    for name in x:
        assert x[name].tobytes() == y[name].tobytes(), name
    mx, my = (zarr.open_group(str(p), mode="r").attrs["lst"] for p in (a, b))
    assert mx["complete"] and my["complete"] and mx["splits"] == my["splits"]


def extract_args(model, data, out):
    return ("extract", model, data, "--out", out, "--device", "cpu", "--store-dtype", "fp32", "--max-length", 16,
            "--batch-size", 8, "--shard-tokens", 64, "--chunk-tokens", 16, "--error-sample", 0)


@pytest.fixture(scope="module")
def reference(tiny_bert, tiny_dataset, tmp_path_factory) -> Path:
    """The uninterrupted store: the same command, in a process of its own, one thread like the killed ones."""
    out = tmp_path_factory.mktemp("fault_ref") / "store"
    run(*extract_args(tiny_bert, tiny_dataset, out))
    return out


def done_shards(out: Path) -> int:
    return sum(1 for _ in out.glob("*/shard_done/c/*"))


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_extract_killed_mid_work_resumes_to_the_same_store(tiny_bert, tiny_dataset, reference, tmp_path, round_):
    rng = random.Random(100 + round_)
    out, after = tmp_path / "s", rng.randint(1, 12)  # the tiny store has ~20 shards
    landed = kill_when(lst(*extract_args(tiny_bert, tiny_dataset, out)), lambda: done_shards(out) >= after,
                       rng.uniform(0, 0.2))
    assert landed == "mid-work"  # (it may have written its last shard: the re-run then only verifies)
    run(*extract_args(tiny_bert, tiny_dataset, out))
    assert_same_store(out, reference)


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_train_killed_mid_run_resumes_to_the_uninterrupted_result(reference, tmp_path, round_):
    rng = random.Random(200 + round_)
    args = ("train", reference, "--device", "cpu", "--epochs", 4, "--seed", 3, "--batch-size", 16)
    run(*args, "--out", tmp_path / "ref")
    out = tmp_path / "run"
    log = out / "train_log.jsonl"
    ckpt = out / "checkpoint.pt"
    landed = kill_when(lst(*args, "--out", out), lambda: ckpt.exists(), rng.uniform(0, 0.5))
    assert landed == "mid-work"
    run(*args, "--out", out)
    want, got = (json.loads((p / "metrics.json").read_text()) for p in (tmp_path / "ref", out))
    assert got["splits"] == want["splits"]
    assert json.loads((out / "predictions.json").read_text()) == json.loads(
        (tmp_path / "ref" / "predictions.json").read_text())
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    ref_losses = [json.loads(line)["loss"] for line in (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()]
    assert losses == ref_losses  # every step once, in order, the same values


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_import_killed_mid_copy_is_redone_by_the_same_command(reference, tmp_path, round_):
    rng = random.Random(300 + round_)
    h5 = tmp_path / "s.h5"
    export_hdf5(reference, h5)
    out = tmp_path / "back"
    kill_when(lst("import", h5, "--out", out), lambda: (out / "train" / "hidden").exists(), rng.uniform(0, 0.05))
    finished = zarr.open_group(str(out), mode="r").attrs["lst"]["complete"]  # killed after its last write
    run("import", h5, "--out", out, *(["--overwrite"] if finished else []))  # an incomplete one is just redone
    assert_same_store(out, reference)


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_export_killed_mid_write_leaves_no_file_and_is_redone(reference, tmp_path, round_):
    rng = random.Random(400 + round_)
    h5 = tmp_path / "s.h5"
    partial = h5.with_name(h5.name + ".partial")
    kill_when(lst("export", reference, h5), lambda: partial.exists(), rng.uniform(0, 0.05))
    assert not h5.exists() or h5.stat().st_size > 0  # never a half file under the real name
    run("export", reference, h5, *(["--overwrite"] if h5.exists() else []))
    run("import", h5, "--out", tmp_path / "back")
    assert_same_store(tmp_path / "back", reference)
