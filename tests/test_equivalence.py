"""Training from an fp32 store is the same computation as LST with the backbone live (--online)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featcache import ExtractConfig, extract
from sidetrain import TrainConfig, train


def losses(run) -> np.ndarray:
    return np.array([json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()])


@pytest.mark.parametrize("backbone", ["tiny_bert", "minilm"])
def test_cached_equals_online(backbone, request, tiny_dataset, banking_small, tmp_path):
    model_dir = request.getfixturevalue(backbone)
    data = tiny_dataset if backbone == "tiny_bert" else banking_small
    store = tmp_path / "store"
    extract(ExtractConfig(model=str(model_dir), dataset=str(data), out=str(store), store_dtype="fp32",
                          max_length=24, device="cpu"))
    common = {"store": str(store), "epochs": 2, "batch_size": 8, "seed": 3, "device": "cpu", "dropout": 0.1,
                  "reduction_factor": 4 if backbone == "tiny_bert" else 8}
    cached = train(TrainConfig(out=str(tmp_path / "cached"), **common))
    online = train(TrainConfig(out=str(tmp_path / "online"), online=True, **common))
    a, b = losses(tmp_path / "cached"), losses(tmp_path / "online")
    assert len(a) == len(b) == cached["steps"] > 10
    np.testing.assert_allclose(a, b, rtol=1e-4)
    pred_a = json.loads((tmp_path / "cached" / "predictions.json").read_text())
    pred_b = json.loads((tmp_path / "online" / "predictions.json").read_text())
    assert pred_a == pred_b and pred_a["dev"]
    assert cached["splits"]["dev"] == online["splits"]["dev"]


def test_training_learns_the_synthetic_task(tiny_bert, tiny_dataset, tmp_path):
    store = tmp_path / "store"
    extract(ExtractConfig(model=str(tiny_bert), dataset=str(tiny_dataset), out=str(store), device="cpu", max_length=16))
    summary = train(TrainConfig(store=str(store), out=str(tmp_path / "run"), epochs=15, batch_size=16, lr=3e-3,
                                reduction_factor=4, device="cpu"))
    assert summary["splits"]["dev"]["accuracy"] >= 0.6  # chance is 1/3
    assert summary["history"][-1]["train_loss"] < summary["history"][0]["train_loss"]
    for name in ("config.json", "metrics.json", "model.safetensors", "predictions.json", "train_log.jsonl"):
        assert (tmp_path / "run" / name).exists()
