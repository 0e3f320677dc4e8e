"""Where training keeps the stored states (sidetrain.data.host_policy) and the memory figures of metrics.json.

The default on a CPU reads the store memory-mapped (page cache, not the run's anonymous memory), a budget
smaller than a split streams it, --preload copies it into RAM, and whatever the policy the batches and the
losses are the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, invoke, synthetic_rows, torch_threads, write_tsv

from featcache import ExtractConfig, extract
from featcache.errors import TrainConfigError
from featcache.reader import open_store
from sidetrain import TrainConfig, train
from sidetrain.data import CachedBatches, host_policy
from sidetrain.kinds.encoder.recipe import build_model, cached_source
from sidetrain.memory import status_bytes
from sidetrain.run_files import MEMORY_KEYS

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = {"store": str(store), "out": str(out), "epochs": 2, "batch_size": 16, "reduction_factor": 4,
            "device": "cpu", "seed": 3}
    return TrainConfig(**{**base, **kw})


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_default_on_cpu_maps_the_store_and_copies_nothing(tiny_store):
    split = open_store(tiny_store).split("train")
    source = cached_source(split, cfg(tiny_store, Path("unused")), CPU)
    assert source.policy == "mmap" and source.held_bytes == 0 and source.mapped_bytes == split.nbytes() > 0
    assert split.reader_kind == "shards"  # memory-mapped shard files, not a copy in RAM ('memory')
    source(np.arange(8))
    assert split.reader_kind == "shards"
    ram = CachedBatches(open_store(tiny_store).split("train"), None, preload=True)
    assert ram.policy == "ram" and ram.held_bytes == split.nbytes() and ram.split.reader_kind == "memory"


def test_budget_smaller_than_the_split_streams(tiny_store):
    split = open_store(tiny_store).split("train")
    under = split.nbytes() / 2**30 / 2
    assert host_policy(split, None, under) == "stream"
    assert host_policy(split, None, 2 * split.nbytes() / 2**30) == "mmap"
    assert host_policy(split, False, 1000.0) == "stream" and host_policy(split, True, 0.0) == "ram"  # asked wins
    source = cached_source(split, cfg(tiny_store, Path("unused"), memory_budget=under), CPU)
    assert source.policy == "stream" and source.held_bytes == 0 and split.reader_kind == "shards"


def test_a_store_that_cannot_be_mapped_is_copied_when_it_fits(tiny_store):
    split = open_store(tiny_store, reader="zarr").split("train")
    assert host_policy(split, None) == "ram"
    assert host_policy(split, None, split.nbytes() / 2**30 / 2) == "stream"


def test_same_losses_under_every_policy_and_the_memory_figures(tiny_store, tmp_path):
    runs = {"mmap": {}, "ram": {"preload": True}, "stream": {"preload": False},
            "budget": {"memory_budget": 0.0}}
    out = {name: train(cfg(tiny_store, tmp_path / name, **kw)) for name, kw in runs.items()}
    ref = losses(tmp_path / "mmap")
    for name in runs:  # the data are the same whatever holds them: exactly the same steps
        assert losses(tmp_path / name) == ref, name
        assert out[name]["splits"] == out["mmap"]["splits"], name
    policy = {name: set(out[name]["memory"]["data_policy"].values()) for name in runs}
    assert policy == {"mmap": {"mmap"}, "ram": {"ram"}, "stream": {"stream"}, "budget": {"stream"}}

    store = open_store(tiny_store)
    m = out["mmap"]["memory"]
    assert list(m) == list(MEMORY_KEYS)
    assert m["data_held_bytes"] == 0 and m["data_device_bytes"] == 0
    assert m["data_mapped_bytes"] == sum(store.split(n).nbytes() for n in ("train", "dev", "test"))
    assert out["ram"]["memory"]["data_held_bytes"] == m["data_mapped_bytes"]
    model = build_model(cfg(tiny_store, tmp_path / "x"), store.manifest)
    trained = [p for p in model.parameters() if p.requires_grad]
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert m["model_bytes"] == weights and m["best_weights_bytes"] == weights
    assert m["gradient_bytes"] == sum(p.numel() * 4 for p in trained)
    # AdamW: exp_avg and exp_avg_sq as large as each parameter, and a float32 step per parameter
    assert m["optimizer_bytes"] == 2 * m["gradient_bytes"] + 4 * len(trained)
    assert m["peak_rss_anon_bytes"] >= m["process_start_rss_anon_bytes"] > 0 and m["peak_rss_file_bytes"] > 0
    assert m["activation_bytes"] >= 0 and m["peak_device_bytes"] is None
    saved = json.loads((tmp_path / "mmap" / "metrics.json").read_text())
    assert saved["memory"] == m and saved["peak_memory_kind"] == "cpu_rss_anon_above_start"
    assert "peak_memory_bytes" in saved and saved["data_wait_seconds"] >= 0


def test_t5_follows_the_policy(tmp_path):
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from featcache.bundled import minilm_path
    from sidetrain.t5.data import CachedSeq2Seq, open_decoder

    model = tmp_path / "t5"
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=30522, d_model=16, d_ff=32, d_kv=4, num_layers=1,
                                        num_decoder_layers=1, num_heads=4, pad_token_id=0, eos_token_id=102,
                                        decoder_start_token_id=0)).save_pretrained(model)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(model)
    write_tsv(tmp_path / "data" / "train.tsv", synthetic_rows(12, 1))
    write_tsv(tmp_path / "data" / "dev.tsv", synthetic_rows(6, 2))
    extract(ExtractConfig(model=str(model), dataset=str(tmp_path / "data"), out=str(tmp_path / "s"),
                          store_dtype="fp32", max_length=12, device="cpu"))
    store = open_store(tmp_path / "s")
    idx = np.arange(6)
    batches = {}
    for name, preload in (("mmap", None), ("ram", True), ("stream", False)):
        split = open_store(tmp_path / "s").split("dev")
        source = CachedSeq2Seq(split, open_decoder(store, "dev"), preload)
        assert source.policy == name and (source.held_bytes > 0) == (name == "ram")
        batches[name] = source(idx)
    for name in ("ram", "stream"):
        for field in ("enc_hidden", "dec_hidden", "targets"):
            torch.testing.assert_close(getattr(batches[name], field), getattr(batches["mmap"], field), rtol=0, atol=0)


def test_invalid_memory_budget_is_one_line(tiny_store, tmp_path):
    assert_user_error(invoke("train", tiny_store, "-o", tmp_path / "r", "--memory-budget", -1), "--memory-budget")
    with pytest.raises(TrainConfigError, match="--memory-budget"):
        TrainConfig(store="s", out="o", memory_budget=float("nan"))


def test_status_bytes_reads_the_process():
    mine = status_bytes()
    assert mine["RssAnon"] > 0 and mine["RssFile"] > 0 and status_bytes(2**22 + 12345) == {}
