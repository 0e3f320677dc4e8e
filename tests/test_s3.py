"""Stores on an object store: a real S3-compatible server (moto's, on loopback, started here) for
extract, resume after kill -9, train, inspect, export / import, the local shard cache, and an
unreachable endpoint (one line, no traceback). Skipped when moto / s3fs are not installed."""

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
from conftest import assert_user_error, invoke

pytest.importorskip("moto")
pytest.importorskip("s3fs")

from featcache import ExtractConfig, extract, open_store
from featcache.hdf5 import export_hdf5, import_hdf5
from featcache.inspect import inspect_store
from sidetrain import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "lst-tests"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (a free port), its environment, and a fresh bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}",
           "LST_SHARD_CACHE": str(tmp_path_factory.mktemp("shard_cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()


def settings(model, data, out) -> ExtractConfig:
    return ExtractConfig(model=str(model), dataset=str(data), out=str(out), max_length=16, batch_size=8,
                         device="cpu", store_dtype="fp16", shard_tokens=64, chunk_tokens=16, error_sample=0)


@pytest.fixture(scope="module")
def local_ref(tiny_bert, tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("s3_ref") / "store"
    extract(settings(tiny_bert, tiny_dataset, out))
    return out


def same_states(a, b) -> None:
    for name in ("train", "dev", "test"):
        x, y = a.split(name), b.split(name)
        np.testing.assert_array_equal(x.stored_rows(np.array([0]), np.array([x.n_tokens])),
                                      y.stored_rows(np.array([0]), np.array([y.n_tokens])), err_msg=name)


def test_extract_train_inspect_export_import_on_s3(s3, tiny_bert, tiny_dataset, local_ref, tmp_path):
    url = f"s3://{BUCKET}/store.zarr"
    r = invoke("extract", tiny_bert, tiny_dataset, "--out", url, "--device", "cpu", "--store-dtype", "fp16",
               "--max-length", 16, "--batch-size", 8, "--shard-tokens", 64, "--chunk-tokens", 16, "--error-sample", 0)
    assert r.exit_code == 0, r.output
    remote, local = open_store(url), open_store(local_ref)
    assert remote.split("train").reader_kind == "cache"  # shards fetched whole into the local cache
    same_states(remote, local)
    cached = list(Path(s3["LST_SHARD_CACHE"]).rglob("*.npy"))
    assert len(cached) >= remote.manifest["splits"]["train"]["shards"]
    info = inspect_store(url)
    assert info["complete"] and info["shards_done"] == info["shards_total"]
    summary = train(TrainConfig(store=url, out=str(tmp_path / "run"), epochs=1, device="cpu", seed=0))
    ref = train(TrainConfig(store=str(local_ref), out=str(tmp_path / "ref_run"), epochs=1, device="cpu", seed=0))
    assert summary["splits"] == ref["splits"]  # the same model from S3 as from local disk
    h5 = tmp_path / "s.h5"
    export_hdf5(url, h5)
    import_hdf5(h5, f"s3://{BUCKET}/back.zarr")
    same_states(open_store(f"s3://{BUCKET}/back.zarr"), local)
    assert_user_error(invoke("import", h5, "--out", f"s3://{BUCKET}/back.zarr"), "already exists", "--overwrite")


def test_a_bad_cached_shard_is_fetched_again(s3, tiny_bert, tiny_dataset, local_ref):
    url = f"s3://{BUCKET}/cache.zarr"
    extract(settings(tiny_bert, tiny_dataset, url))
    same_states(open_store(url), open_store(local_ref))  # fills the cache
    for f in Path(s3["LST_SHARD_CACHE"]).rglob("*.npy"):
        data = bytearray(f.read_bytes())
        data[-3] ^= 0xFF  # flip a value byte of every cached shard
        f.write_bytes(bytes(data))
    same_states(open_store(url), open_store(local_ref))  # verified, dropped, fetched again


KILLED = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    from featcache import ExtractConfig, extract, writer
    real = writer._write_shard
    def slow(*a):
        real(*a)
        time.sleep(0.4)
    writer._write_shard = slow
    model, data, out = sys.argv[1:4]
    extract(ExtractConfig(model=model, dataset=data, out=out, max_length=16, batch_size=8, device="cpu",
                          store_dtype="fp16", shard_tokens=64, chunk_tokens=16, error_sample=0))
""")


def test_extract_to_s3_killed_resumes_to_the_same_store(s3, tiny_bert, tiny_dataset, local_ref, tmp_path):
    import s3fs

    url, script = f"s3://{BUCKET}/killed.zarr", tmp_path / "slow.py"
    script.write_text(KILLED)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_bert), str(tiny_dataset), url], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fs = s3fs.S3FileSystem()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(fs.glob(f"{BUCKET}/killed.zarr/train/shard_done/c/*")) < 2:
            time.sleep(0.2)
            fs.invalidate_cache()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the dead writer's lease expires; here it is taken over at once by pretending its time ran out
    fs.rm(f"{BUCKET}/killed.zarr.lst-lease")
    assert extract(settings(tiny_bert, tiny_dataset, url))["complete"]
    same_states(open_store(url), open_store(local_ref))


def test_unreachable_endpoint_is_one_line(tiny_bert, tiny_dataset, tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    url = f"s3://{BUCKET}/nowhere.zarr"
    t0 = time.time()
    assert_user_error(invoke("extract", tiny_bert, tiny_dataset, "--out", url, "--device", "cpu",
                             "--max-length", 8), "nowhere.zarr")
    assert_user_error(invoke("train", url, "--out", tmp_path / "r"), "nowhere.zarr")
    assert_user_error(invoke("inspect", url), "nowhere.zarr")
    assert time.time() - t0 < 120
    s3fs.S3FileSystem.clear_instance_cache()
