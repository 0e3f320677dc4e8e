"""Multi-node extraction: `torchrun --nnodes 2` (two node groups on loopback, node 0 the rendezvous) into one S3
store (moto's server). The store equals a one-process store; a node killed -9 mid-extraction and the same
command re-run on both nodes gives the same store again. Skipped without torchrun, moto or s3fs, and unless
LST_SLOW_TESTS=1 (it runs three two-node jobs: 2-6 minutes on a busy 2-core machine)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("moto")
pytest.importorskip("s3fs")

from featcache import ExtractConfig, extract, open_store

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
BUCKET = "lst-multinode"
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this python"),
              pytest.mark.skipif(not os.environ.get("LST_SLOW_TESTS"),
                                 reason="slow (2-6 min: three two-node torchrun jobs); set LST_SLOW_TESTS=1")]

# what each node runs (`lst extract` as a library call, so a delay can be put between shards)
SCRIPT = textwrap.dedent("""
    import faulthandler, os, signal, sys, time
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    import torch
    torch.set_num_threads(1)
    from featcache import ExtractConfig, extract, writer
    delay = float(os.environ.get("LST_TEST_SHARD_DELAY", "0"))
    real = writer._write_shard
    def slow(*a):
        real(*a)
        time.sleep(delay)
    writer._write_shard = slow
    model, data, out = sys.argv[1:4]
    extract(ExtractConfig(model=model, dataset=data, out=out, max_length=16, batch_size=8, device="cpu",
                          store_dtype="fp32", shard_tokens=64, chunk_tokens=16, error_sample=0))
""")


def settings(model, data, out) -> ExtractConfig:
    return ExtractConfig(model=str(model), dataset=str(data), out=str(out), max_length=16, batch_size=8,
                         device="cpu", store_dtype="fp32", shard_tokens=64, chunk_tokens=16, error_sample=0)


@pytest.fixture(scope="module")
def s3():
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, args: list[str], tmp_path: Path, delay: float = 0.0) -> list[subprocess.Popen]:
    """Both nodes of one job: each a torchrun with one process, meeting at node 0 (static rendezvous: node 0
    hosts the store, so killing node 1 leaves node 0 a peer to lose, not its rendezvous)."""
    port, procs = free_port(), []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for node in range(2):
        env["LST_TEST_SHARD_DELAY"] = str(delay * (1 + 4 * node))  # node 1 the slower: still mid-way when killed
        log = (tmp_path / f"node{node}.log").open("a")
        procs.append(subprocess.Popen(
            [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
             "--master-addr", "127.0.0.1", "--master-port", str(port), "--max-restarts", "0", str(script), *args],
            env=env, stdout=log, stderr=log, start_new_session=True))  # a session per node: killed as a whole
    return procs


def wait_all(procs: list[subprocess.Popen], tmp_path: Path) -> None:
    for node, p in enumerate(procs):
        code = p.wait(timeout=400)
        assert code == 0, (tmp_path / f"node{node}.log").read_text()[-3000:]


def same_store(url: str, ref) -> None:
    got = open_store(url)
    assert got.manifest["complete"]
    for key in ("splits", "layers", "store_dtype", "request"):
        assert got.manifest[key] == ref.manifest[key], key
    for name in ref.manifest["splits"]:
        x, y = got.split(name), ref.split(name)
        np.testing.assert_array_equal(x.stored_rows(np.array([0]), np.array([x.n_tokens])),
                                      y.stored_rows(np.array([0]), np.array([y.n_tokens])), err_msg=name)


def test_two_nodes_into_one_s3_store_equal_one_process_even_after_a_node_is_killed(s3, tiny_bert, tiny_dataset,
                                                                                   tmp_path):
    import s3fs

    script = tmp_path / "extract.py"
    script.write_text(SCRIPT)
    extract(settings(tiny_bert, tiny_dataset, tmp_path / "single"))  # one process, one thread
    ref = open_store(tmp_path / "single")

    url = f"s3://{BUCKET}/clean.zarr"
    wait_all(launch(script, [str(tiny_bert), str(tiny_dataset), url], tmp_path), tmp_path)
    same_store(url, ref)

    url, fs = f"s3://{BUCKET}/killed.zarr", s3fs.S3FileSystem()
    nodes = launch(script, [str(tiny_bert), str(tiny_dataset), url], tmp_path, delay=0.4)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(fs.glob(f"{BUCKET}/killed.zarr/*/shard_done/c/*")) < 2:
            assert all(p.poll() is None for p in nodes), (tmp_path / "node0.log").read_text()[-2000:]
            time.sleep(0.2)
            fs.invalidate_cache()
        os.killpg(nodes[1].pid, signal.SIGKILL)  # node 1: its torchrun agent and its worker, mid-extraction
        with contextlib.suppress(subprocess.TimeoutExpired):
            nodes[0].wait(timeout=30)
    finally:  # node 0's agent waits for its lost peer (torchrun's exit barrier): stopped as a scheduler would
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert nodes[1].returncode == -signal.SIGKILL
    fs.invalidate_cache()
    assert not open_store_complete(url)  # really stopped mid-way
    if fs.exists(f"{BUCKET}/killed.zarr.lst-lease"):  # rank 0 killed holding it: expires in 60 s; here at once
        fs.rm(f"{BUCKET}/killed.zarr.lst-lease")
    wait_all(launch(script, [str(tiny_bert), str(tiny_dataset), url], tmp_path), tmp_path)  # the same command
    same_store(url, ref)


def open_store_complete(url: str) -> bool:
    import zarr

    from featcache import store as S

    try:
        attrs = dict(zarr.open_group(url, mode="r").attrs)
    except Exception:  # noqa: BLE001 - no group yet
        return False
    return bool(attrs.get(S.MANIFEST_KEY, {}).get("complete"))
