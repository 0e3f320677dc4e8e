"""Storage dtypes (int8 with scales), measured storage error and precision drift, early stop, URL stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from featcache import ExtractConfig, extract, open_store
from featcache import store as S
from featcache.errors import BackboneError
from featcache.text.backbone import load_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

def tiny_cfg(model, data, out, **kw) -> ExtractConfig:
    base = {"model": str(model), "dataset": str(data), "out": str(out), "max_length": 16, "batch_size": 16, "device": "cpu",
                "shard_tokens": 256, "chunk_tokens": 32, "splits": ["train", "dev"], "error_sample": 8}
    return ExtractConfig(**{**base, **kw})


def test_int8_round_trip_is_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 3, 64) * torch.rand(5, 7, 3, 1) * 10
    x[0, 0, 0] = 0.0  # an all-zero vector must stay exactly zero (no division by a zero scale)
    q, scales = S.encode_scaled(x, "int8")
    assert q.dtype == np.int8 and scales.shape == (5, 7, 3) and scales.dtype == np.float32
    back = S.decode(q, "int8", scales)
    step = torch.from_numpy(scales).unsqueeze(-1)
    assert torch.all((back - x).abs() <= step / 2 + 1e-6 * x.abs())
    assert torch.equal(back[0, 0, 0], torch.zeros(64))
    assert np.abs(q).max() == 127  # absmax maps to the last level


def test_int8_store_reads_back_close_to_fp32(tiny_bert, tiny_dataset, tmp_path):
    m32 = extract(tiny_cfg(tiny_bert, tiny_dataset, tmp_path / "fp32", store_dtype="fp32"))
    m8 = extract(tiny_cfg(tiny_bert, tiny_dataset, tmp_path / "int8", store_dtype="int8"))
    n_layers, d = len(m8["layers"]), m8["hidden_size"]
    assert m8["bytes_per_token"] == n_layers * d + 4 * n_layers and m32["bytes_per_token"] == 4 * n_layers * d
    group = zarr.open_group(str(tmp_path / "int8"), mode="r")["train"]
    assert group["hidden"].dtype == np.int8
    assert group["scales"].shape == group["hidden"].shape[:2]
    assert group["scales"].shards[0] == group["hidden"].shards[0]  # a shard of scales per shard of values
    a, b = open_store(tmp_path / "int8").split("train"), open_store(tmp_path / "fp32").split("train")
    for i in (0, 17, len(a) - 1):
        got, want = a.example(i)["hidden"], b.example(i)["hidden"]
        rel = ((got - want).norm() / want.norm()).item()
        assert 0 < rel < 0.01, f"example {i}: relative error {rel}"
    batch = a.batch([3, 1, 4], layers=[0, 2])
    assert batch.hidden.shape[-2:] == (2, d)


def test_manifest_records_measured_storage_error(tiny_bert, tiny_dataset, tmp_path):
    manifest = extract(tiny_cfg(tiny_bert, tiny_dataset, tmp_path / "s", store_dtype="bf16"))
    fid = manifest["fidelity"]
    assert fid["examples"] == 8 and fid["tokens"] > 8 and fid["split"] == "train"
    err = {k: v["rel_error"] for k, v in fid["storage_error"].items()}
    assert set(err) == set(S.STORE_DTYPES) and err["fp32"] == 0.0
    assert 0 < err["fp16"] < err["bf16"] < err["int8"] < 0.02  # each smaller dtype costs more, all small
    assert all(len(v["rel_error_per_layer"]) == 3 for v in fid["storage_error"].values())
    assert fid["storage_error"]["int8"]["cosine_min"] > 0.999
    assert "precision_drift" not in fid  # fp32 compute has no drift to measure
    assert open_store(tmp_path / "s").manifest["fidelity"] == fid  # and it is what readers see


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_precision_drift_is_measured(tiny_bert, tiny_dataset, tmp_path, precision):
    manifest = extract(tiny_cfg(tiny_bert, tiny_dataset, tmp_path / "s", precision=precision, store_dtype="fp32"))
    drift = manifest["fidelity"]["precision_drift"]
    assert manifest["precision"] == precision and 0 < drift["rel_error"] < 0.1
    assert drift["rel_error_per_layer"][0] <= drift["rel_error_per_layer"][-1]  # error grows with depth
    assert manifest["fidelity"]["total_error"]["rel_error"] > 0


def test_int8_on_cuda_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import importlib.util

    from featcache.text import backbone

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(BackboneError, match="bitsandbytes"):
        backbone._bitsandbytes_int8(torch.device("cuda"))


def test_early_stop_runs_only_the_needed_blocks_and_gives_identical_states(minilm):
    bb = load_backbone(str(minilm), "fp32", "cpu")
    calls = [0] * bb.num_layers
    for i, block in enumerate(bb.model.encoder.layer):
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    enc = bb.tokenizer(["a card payment that was declined", "refund"], padding=True, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    full = bb.hidden_states(*args, list(range(7)))
    assert calls == [1] * 6
    calls[:] = [0] * 6
    early = bb.hidden_states(*args, [0, 2])
    assert calls == [1, 1, 0, 0, 0, 0]  # blocks 2..5 never ran
    assert torch.equal(early, full[:, :, [0, 2]])
    assert len(bb.model.encoder.layer) == 6  # the model itself is left whole


def test_memory_url_store(tiny_bert, tiny_dataset, monkeypatch):
    import shutil

    url = "memory://lst-tests/store.zarr"
    manifest = extract(tiny_cfg(tiny_bert, tiny_dataset, url, store_dtype="int8"))
    assert manifest["complete"]
    split = open_store(url).split("dev")
    assert len(split) == 30 and split.example(0)["hidden"].shape[1:] == (3, 32)

    def no_rmtree(*_a, **_k):
        raise AssertionError("shutil.rmtree called on a URL")

    monkeypatch.setattr(shutil, "rmtree", no_rmtree)
    again = extract(tiny_cfg(tiny_bert, tiny_dataset, url, store_dtype="fp16", overwrite=True))
    assert again["store_dtype"] == "fp16"
    group = zarr.open_group(url, mode="r")
    assert "scales" not in group["train"] and group["train"]["hidden"].dtype == np.float16  # old arrays gone
