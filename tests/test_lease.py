"""One writer per store: a second extractor is refused naming the holder; a dead holder's lease is
taken over (local: the kernel drops a killed process's flock; object stores: an expired lease)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import assert_user_error, invoke

from featcache import ExtractConfig, extract, open_store
from featcache.lease import SUFFIX, lease_path, writer_lease

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def args(model, data, out):
    return ("extract", model, data, "--out", out, "--device", "cpu", "--max-length", 8, "--error-sample", 0)


def test_second_writer_is_refused_naming_the_holder(tiny_bert, tiny_dataset, tmp_path):
    out = tmp_path / "s"
    with writer_lease(str(out)):
        r = invoke(*args(tiny_bert, tiny_dataset, out))
        assert_user_error(r, "Another lst process is writing", f"pid {os.getpid()}")
        assert not out.exists()  # refused before anything was written
    assert invoke(*args(tiny_bert, tiny_dataset, out)).exit_code == 0
    assert not Path(lease_path(str(out))).exists()  # released: no stray file beside the store


def test_object_store_lease_refuses_then_takes_over_a_stale_one(tiny_bert, tiny_dataset):
    import fsspec

    out = "memory://lst-lease/store.zarr"
    with writer_lease(out):
        assert_user_error(invoke(*args(tiny_bert, tiny_dataset, out)), "Another lst process is writing")
    fs = fsspec.filesystem("memory")
    stale = {"pid": 1, "host": "gone", "started": time.time() - 600, "id": "x", "expires": time.time() - 1}
    fs.pipe_file("/lst-lease/store.zarr" + SUFFIX, json.dumps(stale).encode())
    assert invoke(*args(tiny_bert, tiny_dataset, out)).exit_code == 0  # the dead holder's lease is taken over
    assert open_store(out).manifest["complete"] and not fs.exists("/lst-lease/store.zarr" + SUFFIX)


SLOW = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    from featcache import ExtractConfig, extract, writer
    real = writer._write_shard
    def slow(*a):
        real(*a)
        time.sleep(0.5)
    writer._write_shard = slow
    model, data, out = sys.argv[1:4]
    extract(ExtractConfig(model=model, dataset=data, out=out, max_length=16, device="cpu", store_dtype="fp32",
                          shard_tokens=64, chunk_tokens=16, error_sample=0))
""")


def test_a_killed_writer_leaves_no_lease_and_the_next_run_resumes(tiny_bert, tiny_dataset, tmp_path):
    out, script = tmp_path / "s", tmp_path / "slow.py"
    script.write_text(SLOW)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_bert), str(tiny_dataset), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("train/shard_done/c/*")):
            time.sleep(0.1)
        lease = json.loads(Path(lease_path(str(out))).read_text())
        assert lease["pid"] == proc.pid
        assert_user_error(invoke(*args(tiny_bert, tiny_dataset, out)), f"pid {proc.pid}")  # while it runs
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    cfg = ExtractConfig(model=str(tiny_bert), dataset=str(tiny_dataset), out=str(out), max_length=16, device="cpu",
                        store_dtype="fp32", shard_tokens=64, chunk_tokens=16, error_sample=0)
    assert extract(cfg)["complete"]  # the kernel dropped the dead holder's lock: this run takes over and resumes
    assert len(open_store(out).split("train")) == 120
