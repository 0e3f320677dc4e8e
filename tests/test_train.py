"""The production trainer: reproducibility, resume after a kill, probe, data loading, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import write_tsv

from featcache import ExtractConfig, extract
from featcache.errors import LstError, StoreError, TrainConfigError
from featcache.reader import open_store
from sidetrain import TrainConfig, train
from sidetrain.data import DeviceBatches
from sidetrain.kinds.encoder.recipe import build_model


def losses(run: Path) -> np.ndarray:
    return np.array([json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()])


@pytest.fixture(scope="module")
def store(tiny_store) -> Path:
    return tiny_store


def cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = {"store": str(store), "out": str(out), "epochs": 2, "batch_size": 16, "reduction_factor": 4, "device": "cpu",
            "seed": 5}
    return TrainConfig(**{**base, **kw})


def test_same_seed_same_losses_with_and_without_prefetch(store, tmp_path):
    a = train(cfg(store, tmp_path / "a"))
    b = train(cfg(store, tmp_path / "b", prefetch=False))
    np.testing.assert_array_equal(losses(tmp_path / "a"), losses(tmp_path / "b"))
    assert a["splits"] == b["splits"]
    assert 0 <= a["data_wait_fraction"] <= 1 and "data_wait_fraction" in a["history"][0]
    train(cfg(store, tmp_path / "c", seed=6))
    assert not np.array_equal(losses(tmp_path / "a"), losses(tmp_path / "c"))


def test_layer_dropping_side_heads_and_probe(store, tmp_path):
    s = train(cfg(store, tmp_path / "drop", layers=[2], side_heads=2))
    assert json.loads((tmp_path / "drop" / "config.json").read_text())["layers"] == [2]
    full = build_model(cfg(store, tmp_path / "all"), open_store(str(store)).manifest)
    assert s["trainable_parameters"] < sum(p.numel() for p in full.parameters())
    p = train(cfg(store, tmp_path / "probe", head="probe"))
    assert p["head"] == "probe" and p["splits"]["dev"]["accuracy"] > 0.45  # chance is 1/3
    assert set(p["splits"]) == {"dev", "test"}
    memory, d = p["memory"], open_store(str(store)).manifest["hidden_size"]  # the probe's, split as lst train's
    n_labels = open_store(str(store)).manifest["task"]["num_labels"]
    assert memory["model_bytes"] == memory["gradient_bytes"] == (d + 1) * n_labels * 4 and memory["optimizer_bytes"] > 0
    features = sum(len(open_store(str(store)).split(n)) for n in ("train", "dev", "test")) * d * 4
    assert memory["data_held_bytes"] >= features and set(memory["data_policy"]) == {"train", "dev", "test"}


SCRIPT = """
import sys
from sidetrain import TrainConfig, train
train(TrainConfig(store=sys.argv[1], out=sys.argv[2], epochs=int(sys.argv[3]), batch_size=8, reduction_factor=4,
                  device="cpu", seed=2))
"""


def test_resume_after_kill_equals_uninterrupted(store, tmp_path):
    epochs = 6
    full = train(TrainConfig(store=str(store), out=str(tmp_path / "full"), epochs=epochs, batch_size=8,
                             reduction_factor=4, device="cpu", seed=2))
    run = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), str(store), str(run), str(epochs)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists(), "the run finished before the kill; make it longer"
    resumed = train(TrainConfig(store=str(store), out=str(run), epochs=epochs, batch_size=8, reduction_factor=4,
                                device="cpu", seed=2))
    np.testing.assert_array_equal(losses(run), losses(tmp_path / "full"))
    assert resumed["splits"] == full["splits"]
    with pytest.raises(TrainConfigError, match="lr"):
        train(TrainConfig(store=str(store), out=str(run), epochs=epochs, batch_size=8, reduction_factor=4,
                          device="cpu", seed=2, lr=1e-3))


def test_bad_options_name_what_would_work(store, tmp_path):
    with pytest.raises(TrainConfigError, match=r"--reduction-factor in \[2, 4, 8\]"):
        train(cfg(store, tmp_path / "r", reduction_factor=3))
    with pytest.raises(TrainConfigError, match="--side-heads in"):
        train(cfg(store, tmp_path / "r", side_heads=3))
    with pytest.raises(TrainConfigError, match=r"block layers \[1, 2\].*\[7\] out of range"):
        train(cfg(store, tmp_path / "r", layers=[1, 7]))
    with pytest.raises(StoreError, match="split 'nope'"):
        train(cfg(store, tmp_path / "r", train_split="nope"))
    with pytest.raises(TrainConfigError, match="--metric"):
        train(cfg(store, tmp_path / "r", metric="pearson"))


def test_store_without_labels(tiny_bert, tmp_path):
    data = tmp_path / "data"
    write_tsv(data / "train.tsv", [("hello there",), ("good bye",)], header=("text",))
    extract(ExtractConfig(model=str(tiny_bert), dataset=str(data), out=str(tmp_path / "s"), device="cpu"))
    with pytest.raises(LstError, match="labels in split 'train'"):
        train(cfg(tmp_path / "s", tmp_path / "r"))


def test_nan_in_store_is_named(tiny_bert, tiny_dataset, tmp_path):
    path = tmp_path / "s"
    extract(ExtractConfig(model=str(tiny_bert), dataset=str(tiny_dataset), out=str(path), store_dtype="fp32",
                          max_length=16, device="cpu"))
    offsets = zarr.open_group(str(path), mode="r")["train/offsets"][:]
    hidden = zarr.open_array(str(path / "train" / "hidden"), mode="r+")
    hidden[int(offsets[7]), 1, 3] = np.nan  # example 7, layer 1
    rows = hidden.shards[0]  # as if the backbone had produced it (fp16 overflow): its checksum follows
    zarr.open_array(str(path / "train" / "shard_crc"), mode="r+")[0] = zlib.crc32(np.ascontiguousarray(hidden[:rows]))
    with pytest.raises(StoreError, match="split 'train', example 7"):
        train(cfg(path, tmp_path / "r", preload=False))
    # a split held on the device is checked once, when it is loaded (not per batch)
    with pytest.raises(StoreError, match="split 'train', example 7"):
        DeviceBatches(open_store(str(path)).split("train"), None, torch.device("cpu"))


def test_sentence_pair_regression(tiny_bert, tmp_path):
    """STS-B-like: two texts per row, a float score; Pearson/Spearman selected, accuracy refused."""
    import random

    from conftest import WORDS

    rng = random.Random(0)

    def rows(n: int) -> list[tuple]:
        out = []
        for _ in range(n):
            a = [rng.choice(WORDS) for _ in range(6)]
            k = rng.randint(0, 6)  # the score is how many words the pair shares
            out.append((" ".join(a), " ".join(a[:k] + [rng.choice(WORDS) for _ in range(6 - k)]), f"{k * 5 / 6:.2f}"))
        return out

    data = tmp_path / "data"
    write_tsv(data / "train.tsv", rows(64), header=("sentence1", "sentence2", "score"))
    write_tsv(data / "dev.tsv", rows(16), header=("sentence1", "sentence2", "score"))
    extract(ExtractConfig(model=str(tiny_bert), dataset=str(data), out=str(tmp_path / "s"), device="cpu",
                          max_length=32))
    s = train(cfg(tmp_path / "s", tmp_path / "r"))
    assert s["metric"] == "pearson" and set(s["splits"]["dev"]) == {"pearson", "spearman"}
    with pytest.raises(TrainConfigError, match="--metric"):
        train(cfg(tmp_path / "s", tmp_path / "r2", metric="accuracy"))


@pytest.mark.parametrize("folder,task,labels,metric", [
    ("/data/glue/CoLA", "classification", 2, "matthews"), ("/data/MRPC", "classification", 2, "f1"),
    ("/x/qqp", "classification", 2, "f1"), ("/x/STS-B", "regression", 1, "pearson"),
    ("/x/SST-2", "classification", 2, "accuracy"), ("/x/banking", "classification", 77, "accuracy"),
    ("/x/mrpc", "classification", 3, "accuracy"),  # not GLUE's MRPC: binary F1 does not apply
    ("/x/sick", "regression", 1, "pearson")])
def test_default_metric_follows_the_glue_task(folder, task, labels, metric):
    from sidetrain.metrics import default_metric

    assert default_metric({"task": {"type": task, "num_labels": labels}, "dataset": {"source": folder}}) == metric
