"""Resume and crash safety: a killed extraction (a real kill -9) resumes to the same bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from featcache import ExtractConfig, extract, open_store
from featcache import writer as W
from featcache.errors import StoreError

ROOT = Path(__file__).resolve().parents[1]

# Run in a child process: the same extraction, optionally slowed down so the parent can kill it mid-way.

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)  # the same arithmetic in every process, so bytes can be compared
    from featcache import ExtractConfig, extract, writer
    model, data, out, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    if delay:
        real = writer._write_shard
        def slow(*args):
            time.sleep(delay)  # widen the window in which the parent's kill lands
            real(*args)
        writer._write_shard = slow
    extract(ExtractConfig(model=model, dataset=data, out=out, max_length=16, batch_size=8, device="cpu",
                          store_dtype="fp32", shard_tokens=32, chunk_tokens=16, error_sample=4))
""")


def run_child(script: Path, model: Path, data: Path, out: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(model), str(data), str(out), str(delay)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def done_shards(store: Path) -> int:
    return sum(1 for p in store.glob("*/shard_done/c/*") if p.is_file())


def hidden_arrays(store: Path) -> dict[str, np.ndarray]:
    """hidden (and int8 scales) of every split."""
    group = zarr.open_group(str(store), mode="r")
    return {f"{name}/{key}": group[name][key][:] for name in ("train", "dev", "test")
            for key in ("hidden", "scales") if key in group[name]}


def assert_same_bytes(a: Path, b: Path) -> None:
    x, y = hidden_arrays(a), hidden_arrays(b)
    assert set(x) == set(y)
    for name in x:
        assert x[name].dtype == y[name].dtype and x[name].shape == y[name].shape
        assert x[name].tobytes() == y[name].tobytes(), f"{name} differs"


@pytest.mark.parametrize("kill_after", [0, 4])  # 0: as soon as the store appears (layout, fidelity sample)
def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny_bert, tiny_dataset, tmp_path, kill_after):
    script = tmp_path / "run_extract.py"
    script.write_text(SCRIPT)
    reference, killed = tmp_path / "reference", tmp_path / "killed"

    child = run_child(script, tiny_bert, tiny_dataset, killed, delay=0.1)
    deadline = time.monotonic() + 120
    while not (killed / "zarr.json").exists() or done_shards(killed) < kill_after:
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the child wrote no shards in time"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    n_done = done_shards(killed)
    # one thread, like the child: the same arithmetic in this process (saves two interpreter starts)
    child_cfg = {"max_length": 16, "batch_size": 8, "shard_tokens": 32, "chunk_tokens": 16, "error_sample": 4}
    full = extract(cfg(tiny_bert, tiny_dataset, reference, **child_cfg))  # uninterrupted
    total = sum(s["shards"] for s in full["splits"].values())
    assert kill_after <= n_done < total  # really killed mid-way
    manifest = zarr.open_group(str(killed), mode="r").attrs.get("lst")  # None: killed before the manifest
    assert manifest is None or not manifest["complete"]
    with pytest.raises(StoreError, match="incomplete|manifest"):
        open_store(killed)  # a killed store never reads back as if it were whole

    assert extract(cfg(tiny_bert, tiny_dataset, killed, **child_cfg))["complete"]  # resume
    assert open_store(killed).manifest["complete"]
    assert_same_bytes(killed, reference)


def cfg(model, data, out, **kw) -> ExtractConfig:
    base = {"model": str(model), "dataset": str(data), "out": str(out), "max_length": 16, "batch_size": 8, "device": "cpu",
                "store_dtype": "fp32", "shard_tokens": 64, "chunk_tokens": 16, "error_sample": 0}
    return ExtractConfig(**{**base, **kw})


class Crash(Exception):
    pass


@pytest.mark.parametrize("store_dtype", ["fp32", "int8"])
def test_crash_between_data_and_done_flag_redoes_the_shard(tiny_bert, tiny_dataset, tmp_path, monkeypatch,
                                                           store_dtype):
    """A shard whose values landed but whose done flag did not is recomputed, never trusted."""
    real, calls = W._write_shard, []

    def crash_on_third(g, k, start, stop, buffer, scales):
        calls.append(k)
        if len(calls) == 3:
            g["hidden"][start:stop] = buffer + 1  # garbage in place, flag never set
            raise Crash
        real(g, k, start, stop, buffer, scales)

    monkeypatch.setattr(W, "_write_shard", crash_on_third)
    with pytest.raises(Crash):
        extract(cfg(tiny_bert, tiny_dataset, tmp_path / "s", store_dtype=store_dtype))
    monkeypatch.setattr(W, "_write_shard", real)
    extract(cfg(tiny_bert, tiny_dataset, tmp_path / "s", store_dtype=store_dtype))
    extract(cfg(tiny_bert, tiny_dataset, tmp_path / "ref", store_dtype=store_dtype))
    assert_same_bytes(tmp_path / "s", tmp_path / "ref")


def test_crash_during_layout_is_rebuilt_on_resume(tiny_bert, tiny_dataset, tmp_path, monkeypatch):
    real = W._create_split

    def crash(group, split, *args):
        if split == "test":
            raise Crash  # manifest written, layout half made
        real(group, split, *args)

    monkeypatch.setattr(W, "_create_split", crash)
    with pytest.raises(Crash):
        extract(cfg(tiny_bert, tiny_dataset, tmp_path / "s"))
    manifest = zarr.open_group(str(tmp_path / "s"), mode="r").attrs["lst"]
    assert manifest["layout_complete"] is False and "test" not in zarr.open_group(str(tmp_path / "s"), mode="r")
    monkeypatch.setattr(W, "_create_split", real)
    assert extract(cfg(tiny_bert, tiny_dataset, tmp_path / "s"))["complete"]
    assert len(open_store(tmp_path / "s").split("test")) == 30


def test_resume_with_other_options_is_refused(tiny_bert, tiny_dataset, tmp_path, monkeypatch):
    def crash(*_a):
        raise Crash

    monkeypatch.setattr(W, "_write_shard", crash)
    with pytest.raises(Crash):
        extract(cfg(tiny_bert, tiny_dataset, tmp_path / "s"))
    monkeypatch.undo()
    with pytest.raises(StoreError, match="max_length"):
        extract(cfg(tiny_bert, tiny_dataset, tmp_path / "s", max_length=12))
    assert extract(cfg(tiny_bert, tiny_dataset, tmp_path / "s", max_length=12, overwrite=True))["max_length"] == 12


def test_killed_before_the_manifest_is_resumed(tiny_bert, tiny_dataset, tmp_path):
    """A bare Zarr group (created, manifest not yet written) is ours to fill; another group is not."""
    zarr.open_group(str(tmp_path / "s"), mode="a")  # what a kill right after group creation leaves
    assert extract(cfg(tiny_bert, tiny_dataset, tmp_path / "s", splits=["dev"]))["complete"]
    other = zarr.open_group(str(tmp_path / "other"), mode="a")
    other.attrs["owner"] = "someone else"
    with pytest.raises(StoreError, match="something else"):
        extract(cfg(tiny_bert, tiny_dataset, tmp_path / "other", splits=["dev"]))
