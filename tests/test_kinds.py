"""Store kinds: detection and registry, and the shared writer's guarantees for every kind (here T5,
whose extraction used to bypass them: empty --layers, unchecked `complete`, no torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import synthetic_rows, write_tsv

from featcache import ExtractConfig, extract, open_store
from featcache import writer as W
from featcache.errors import StoreError
from featcache.kinds import kind_for_request, registered_kinds
from featcache.manifest import kind_of

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_t5(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from featcache.bundled import minilm_path

    path = tmp_path_factory.mktemp("small_t5")
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=30522, d_model=16, d_ff=32, d_kv=4, num_layers=2,
                                        num_decoder_layers=2, num_heads=4, pad_token_id=0, eos_token_id=102,
                                        decoder_start_token_id=0)).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small_data")
    write_tsv(path / "train.tsv", synthetic_rows(24, 1))
    write_tsv(path / "dev.tsv", synthetic_rows(8, 2))
    return path


def t5_config(model, data, out, **kw) -> ExtractConfig:
    return ExtractConfig(model=str(model), dataset=str(data), out=str(out), store_dtype="fp32", max_length=12,
                         batch_size=4, device="cpu", shard_tokens=64, chunk_tokens=16, error_sample=0, **kw)


def test_kinds_are_registered_detected_and_recorded(tiny_store, tiny_bert, small_t5):
    from transformers import AutoConfig

    assert registered_kinds()[:5] == ["vision_language", "seq2seq", "image", "decoder", "encoder"]  # precedence
    cfg = ExtractConfig(model="m", dataset="d", out="o")
    assert kind_for_request(cfg, AutoConfig.from_pretrained(tiny_bert)).name == "encoder"
    assert kind_for_request(cfg, AutoConfig.from_pretrained(small_t5)).name == "seq2seq"
    manifest = open_store(tiny_store).manifest
    assert manifest["kind"] == kind_of(manifest) == "encoder"
    assert manifest["parts"] == {"": {"layers": [0, 1, 2], "hidden_size": 32, "bytes_per_token": 3 * 32 * 4,
                                      "shard_tokens": manifest["shard_tokens"]}}
    # stores written before kinds were recorded
    assert kind_of({"seq2seq": {}}) == "seq2seq" and kind_of({"layers": [0]}) == "encoder"


def test_t5_store_records_its_parts_and_sizes_them_before_running(small_t5, small_data, tmp_path):
    dry = extract(t5_config(small_t5, small_data, tmp_path / "dry", dry_run=True))["preflight"]
    assert not (tmp_path / "dry").exists()
    dev = dry["splits"]["dev"]["parts"]
    assert dev["dec"]["rows"] == 8 * 3 and dev["dec"]["tokens"] > 0  # every candidate on dev: sized up front
    manifest = extract(t5_config(small_t5, small_data, tmp_path / "s"))
    assert manifest["kind"] == "seq2seq" and manifest["parts"]["dec"]["layers"] == [0, 1, 2]
    assert manifest["splits"]["dev"]["parts"] == dev
    assert dry["bytes"] == sum(p["tokens"] * manifest["parts"][name]["bytes_per_token"]
                               for s in manifest["splits"].values() for name, p in s["parts"].items())


def test_t5_empty_layers_is_a_clear_error(small_t5, small_data, tmp_path):
    with pytest.raises(StoreError, match="--layers within 0..2"):  # was an IndexError
        extract(t5_config(small_t5, small_data, tmp_path / "s", layers=[]))
    assert not (tmp_path / "s").exists()


def test_t5_store_is_complete_only_when_every_shard_is_done(small_t5, small_data, tmp_path, monkeypatch):
    """A decoder shard whose done mark was lost: the store stays incomplete and the next run redoes it."""
    real, lost = W._write_shard, []

    def forget_one_mark(g, k, start, stop, buffer, scales):
        real(g, k, start, stop, buffer, scales)
        if g.basename == "dec" and not lost:
            g["shard_done"][k] = 0
            lost.append((g.path, k))

    monkeypatch.setattr(W, "_write_shard", forget_one_mark)
    with pytest.raises(StoreError, match="Shards still unwritten"):
        extract(t5_config(small_t5, small_data, tmp_path / "s"))
    assert not zarr.open_group(str(tmp_path / "s"), mode="r").attrs["lst"]["complete"]
    monkeypatch.setattr(W, "_write_shard", real)
    assert extract(t5_config(small_t5, small_data, tmp_path / "s"))["complete"]
    assert open_store(tmp_path / "s").split("train").part("dec").n_tokens > 0


SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from featcache import ExtractConfig, extract, writer
    model, data, out, log_dir = sys.argv[1:5]
    real, mine = writer._write_shard, []
    def record(g, k, *args):
        mine.append([g.path, k])
        real(g, k, *args)
    writer._write_shard = record
    manifest = extract(ExtractConfig(model=model, dataset=data, out=out, store_dtype="fp32", max_length=12,
                                     batch_size=4, device="cpu", shard_tokens=64, chunk_tokens=16, error_sample=0))
    with open(os.path.join(log_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"shards": mine, "complete": manifest["complete"]}, f)
""")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this python")
def test_t5_under_torchrun_equals_one_process(small_t5, small_data, tmp_path):
    """Every kind scales out through the shared writer (T5 extraction used to refuse torchrun)."""
    script, logs = tmp_path / "run.py", tmp_path / "logs"
    script.write_text(SCRIPT)
    logs.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script), str(small_t5),
                           str(small_data), str(tmp_path / "dist"), str(logs)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((logs / f"rank{r}.json").read_text()) for r in range(2)]
    a, b = ({tuple(x) for x in r["shards"]} for r in ranks)
    assert a and b and not a & b and all(r["complete"] for r in ranks)
    assert any("dec" in path for path, _ in a | b)  # decoder shards were shared out too
    extract(t5_config(small_t5, small_data, tmp_path / "single"))
    x, y = zarr.open_group(str(tmp_path / "dist"), mode="r"), zarr.open_group(str(tmp_path / "single"), mode="r")
    for name in ("train/hidden", "dev/hidden", "train/dec/hidden", "dev/dec/hidden", "dev/dec/target_ids"):
        np.testing.assert_array_equal(x[name][:], y[name][:], err_msg=name)
