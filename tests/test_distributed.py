"""Scale-out: two processes under torchrun (gloo, CPU) write disjoint shards of one store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import zarr

from featcache import ExtractConfig, extract, open_store
from featcache.distributed import Context

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from featcache import ExtractConfig, extract, writer
    model, data, out, log_dir = sys.argv[1:5]
    real, mine = writer._write_shard, []
    def record(g, k, *args):
        mine.append([g.basename, k])
        real(g, k, *args)
    writer._write_shard = record
    manifest = extract(ExtractConfig(model=model, dataset=data, out=out, max_length=16, batch_size=8, device="cpu",
                                     store_dtype="fp32", shard_tokens=64, chunk_tokens=16, error_sample=4))
    with open(os.path.join(log_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"shards": mine, "complete": manifest["complete"]}, f)
""")


def settings(model, data, out) -> ExtractConfig:
    return ExtractConfig(model=str(model), dataset=str(data), out=str(out), max_length=16, batch_size=8,
                         device="cpu", store_dtype="fp32", shard_tokens=64, chunk_tokens=16, error_sample=4)


def test_share_is_disjoint_and_covers_everything():
    items = list(range(11))
    blocks = [Context(rank=r, world=3).share(items) for r in range(3)]
    assert [x for b in blocks for x in b] == items and all(blocks)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this python")
def test_torchrun_two_processes_equal_one(tiny_bert, tiny_dataset, tmp_path):
    script, logs = tmp_path / "run.py", tmp_path / "logs"
    script.write_text(SCRIPT)
    logs.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script), str(tiny_bert),
                           str(tiny_dataset), str(tmp_path / "dist"), str(logs)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((logs / f"rank{r}.json").read_text()) for r in range(2)]
    a, b = ({tuple(x) for x in r["shards"]} for r in ranks)
    assert a and b and not a & b  # both ranks worked, on disjoint shards
    assert all(r["complete"] for r in ranks)

    extract(settings(tiny_bert, tiny_dataset, tmp_path / "single"))  # one thread, like each rank
    dist, single = open_store(tmp_path / "dist"), open_store(tmp_path / "single")
    assert a | b == {(n, k) for n, s in single.manifest["splits"].items() for k in range(s["shards"])}
    for key in ("splits", "layers", "store_dtype", "request", "fidelity"):
        assert dist.manifest[key] == single.manifest[key], key
    for name in ("train", "dev", "test"):
        x = zarr.open_group(str(tmp_path / "dist"), mode="r")[name]["hidden"][:]
        y = zarr.open_group(str(tmp_path / "single"), mode="r")[name]["hidden"][:]
        assert x.tobytes() == y.tobytes(), name
