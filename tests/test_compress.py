"""Compressed stores (`lst extract --components K`): coefficients on a PCA basis per stored layer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import assert_user_error, invoke, torch_threads, write_tsv

from featcache import ExtractConfig, extract, open_store
from featcache.bundled import easy_vqa_dataset
from featcache.errors import StoreError
from featcache.hdf5 import export_hdf5, import_hdf5
from featcache.text.backbone import load_backbone
from sidetrain import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
K = 8  # of d = 32 in the tiny backbones


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def config(model, data, out, **kw) -> ExtractConfig:
    base = {"model": str(model), "dataset": str(data), "out": str(out), "store_dtype": "fp32", "max_length": 16,
            "device": "cpu", "batch_size": 8, "error_sample": 2, "components": K}
    return ExtractConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def compressed(tiny_bert, tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compressed") / "store"
    with torch_threads(1):
        extract(config(tiny_bert, tiny_dataset, out))
    return out


def losses(run: Path) -> np.ndarray:
    return np.array([json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()])


def test_stored_coefficients_are_the_projection_of_a_fresh_forward(compressed, tiny_bert):
    store = open_store(compressed)
    basis = store.bases[""]
    assert basis.components.shape == (3, 32, K) and store.manifest["parts"][""]["components"] == K
    u = basis.components
    assert torch.allclose(u.transpose(1, 2) @ u, torch.eye(K).expand(3, K, K), atol=1e-5)  # orthonormal
    backbone = load_backbone(str(tiny_bert), "fp32", "cpu")
    dev = store.split("dev")
    for i in (0, 5):
        lo, hi = dev.offsets[i], dev.offsets[i + 1]
        ids = torch.from_numpy(dev.input_ids[lo:hi].astype(np.int64))[None]
        fresh = backbone.hidden_states(ids, torch.ones_like(ids), torch.zeros_like(ids), [0, 1, 2])[0]
        stored = torch.from_numpy(dev.stored_rows(np.array([lo]), np.array([hi])))
        assert stored.shape == (hi - lo, 3, K)
        torch.testing.assert_close(stored, basis.project(fresh), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dev.example(i)["hidden"], basis.reconstruct(basis.project(fresh)),
                                   atol=1e-4, rtol=1e-4)


def test_reconstruction_error_is_one_minus_the_explained_variance(compressed, tiny_store):
    """The fit sample (16,384 tokens by default) holds every training token here: the error on the training
    split is exactly what the basis leaves out."""
    full, small = open_store(tiny_store).split("train"), open_store(compressed)
    record = small.manifest["compression"]["parts"][""]
    assert record["fitted_tokens"] == full.n_tokens
    lo, hi = full.offsets[:-1], full.offsets[1:]
    h, rebuilt = full.hidden_rows(lo, hi), small.split("train").hidden_rows(lo, hi)
    centred = h - h.mean(0)
    error = ((h - rebuilt) ** 2).sum((0, 2)) / (centred ** 2).sum((0, 2))
    np.testing.assert_allclose(error.numpy(), 1 - np.array(record["explained_variance"]), atol=2e-4)
    assert 0.3 < min(record["explained_variance"]) < 1  # K = d/4 of a random model: well short of everything


def test_cached_equals_online_with_fp32_coefficients(compressed, tiny_dataset, tmp_path):
    common = {"store": str(compressed), "epochs": 2, "batch_size": 8, "seed": 3, "device": "cpu",
              "reduction_factor": 4}
    cached = train(TrainConfig(out=str(tmp_path / "cached"), **common))
    online = train(TrainConfig(out=str(tmp_path / "online"), online=True, **common))
    a, b = losses(tmp_path / "cached"), losses(tmp_path / "online")
    assert len(a) == len(b) == cached["steps"] > 10
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert cached["splits"]["dev"] == online["splits"]["dev"]
    config_json = json.loads((tmp_path / "cached" / "config.json").read_text())
    assert config_json["store_manifest"]["compression"]["components"] == K  # what `lst predict` must apply
    # live inference projects the live states onto the store's basis (RUN/bases.safetensors): the cached evaluation
    from featcache.errors import LstError
    from sidetrain import LadderModel
    from sidetrain.predict import predict_lines

    assert (tmp_path / "cached" / "bases.safetensors").is_file()
    texts = [line.split("\t")[0] for line in (tiny_dataset / "dev.tsv").read_text().splitlines()[1:]]
    names = config_json["store_manifest"]["task"]["label_names"]
    cached_labels = [names[i] for i in json.loads((tmp_path / "cached" / "predictions.json").read_text())["dev"]]
    assert predict_lines(str(tmp_path / "cached"), texts, device="cpu") == cached_labels
    model = LadderModel.from_pretrained(tmp_path / "cached", device="cpu")
    saved = model.save_pretrained(tmp_path / "saved")
    assert (saved / "bases.safetensors").is_file() and LadderModel.from_pretrained(saved).predict(texts) == cached_labels
    (tmp_path / "cached" / "bases.safetensors").unlink()  # a run from before the bases were kept: one line
    with pytest.raises(LstError, match="bases.safetensors"):
        LadderModel.from_pretrained(tmp_path / "cached")


def test_the_probe_trains_from_a_compressed_store(compressed, tmp_path):
    summary = train(TrainConfig(store=str(compressed), out=str(tmp_path / "probe"), head="probe", device="cpu",
                                epochs=2))
    assert 0 <= summary["splits"]["dev"]["accuracy"] <= 1


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    from featcache import ExtractConfig, extract, compress
    real = compress.write_basis
    def slow(*args):
        crc = real(*args)
        time.sleep(60)  # the parent kills the process here, the basis written but not yet recorded
        return crc
    compress.write_basis = slow
    model, data, out = sys.argv[1:4]
    extract(ExtractConfig(model=model, dataset=data, out=out, store_dtype="fp32", max_length=16, device="cpu",
                          batch_size=8, error_sample=2, components=8))
""")


def test_a_kill_during_the_fit_resumes_to_the_same_store(tiny_bert, tiny_dataset, compressed, tmp_path):
    script, out = tmp_path / "fit.py", tmp_path / "killed"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(script), str(tiny_bert), str(tiny_dataset), str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "compression" / "root" / "explained" / "zarr.json").exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the child never wrote a basis"
        time.sleep(0.05)
    time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    manifest = zarr.open_group(str(out), mode="r").attrs["lst"]
    assert not manifest.get("layout_complete") and "compression" not in manifest
    with pytest.raises(StoreError, match="incomplete"):
        open_store(out)
    extract(config(tiny_bert, tiny_dataset, out))  # the same command: refits from the seed, then the shards
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(str(compressed), mode="r")
    for name in ("compression/root/components", "compression/root/mean", "train/hidden", "dev/hidden"):
        assert a[name][:].tobytes() == b[name][:].tobytes(), name


def test_a_damaged_basis_is_refused_named_by_verify_and_refitted(tiny_bert, tiny_dataset, tmp_path):
    out = tmp_path / "store"
    extract(config(tiny_bert, tiny_dataset, out))
    before = open_store(out).split("dev").batch([0, 1]).hidden
    mean = zarr.open_group(str(out), mode="r+")["compression/root/mean"]
    mean[0, 0] = mean[0, 0] + 1.0
    with pytest.raises(StoreError, match="basis of part 'root'.*damaged"):
        open_store(out)
    r = invoke("inspect", out, "--verify")
    assert r.exit_code == 1 and "bad basis" in r.output, r.output
    extract(config(tiny_bert, tiny_dataset, out))  # the same command repairs it
    torch.testing.assert_close(open_store(out).split("dev").batch([0, 1]).hidden, before)


def test_hdf5_round_trip_keeps_the_basis(compressed, tmp_path):
    h5 = export_hdf5(compressed, tmp_path / "store.h5")
    import_hdf5(h5, tmp_path / "back")
    a, b = open_store(compressed), open_store(tmp_path / "back")
    assert b.manifest["compression"] == a.manifest["compression"]
    torch.testing.assert_close(b.bases[""].components, a.bases[""].components, rtol=0, atol=0)
    torch.testing.assert_close(b.split("dev").batch([0, 2]).hidden, a.split("dev").batch([0, 2]).hidden,
                               rtol=0, atol=0)


def test_dry_run_and_inspect_show_k_the_explained_variance_and_the_bytes(compressed, tiny_bert, tiny_dataset,
                                                                          tmp_path):
    r = invoke("extract", tiny_bert, tiny_dataset, "--out", tmp_path / "s", "--max-length", 16, "--components", K,
               "--store-dtype", "fp32", "--dry-run")
    assert r.exit_code == 0 and "PCA components" in r.output and "4.0x smaller" in r.output, r.output
    r = invoke("inspect", compressed)
    assert r.exit_code == 0 and f"K={K} of d=32" in r.output and "explained variance" in r.output, r.output
    info = json.loads(invoke("inspect", compressed, "--json").output)
    assert info["compression"]["parts"][""]["components"] == K
    assert info["bytes_per_token"] == 3 * K * 4  # three layers of K fp32 coefficients


def test_int8_coefficients(tiny_bert, tiny_dataset, compressed, tmp_path):
    out = tmp_path / "int8"
    extract(config(tiny_bert, tiny_dataset, out, store_dtype="int8"))
    a, b = open_store(out).split("dev"), open_store(compressed).split("dev")
    assert a.stored_rows(a.offsets[:1], a.offsets[1:2]).dtype == np.int8
    x, y = a.batch([0, 1, 2]).hidden, b.batch([0, 1, 2]).hidden
    assert float((x - y).norm() / y.norm()) < 0.02


@pytest.mark.parametrize("args, words", [
    (("--components", 0), ["--components of at least 1"]),
    (("--components", 33), ["--components at most the width d = 32"]),
    (("--components", 16, "--components-sample", 8), ["--components-sample of at least --components (16)"]),
])
def test_bad_inputs_are_one_line(tiny_bert, tiny_dataset, tmp_path, args, words):
    assert_user_error(invoke("extract", tiny_bert, tiny_dataset, "--out", tmp_path / "s", "--dry-run", *args), *words)


def test_k_larger_than_the_training_tokens_is_refused(tiny_bert, tmp_path):
    data = tmp_path / "few"
    write_tsv(data / "train.tsv", [("card", "a"), ("fee", "b")])
    r = invoke("extract", tiny_bert, data, "--out", tmp_path / "s", "--dry-run", "--components", 20)
    assert_user_error(r, "--components at most the 6 tokens")


# Every kind: extracts with --components, and trains from the store and online to the same losses.


def cached_and_online(store: Path, tmp_path: Path, **kw) -> tuple[np.ndarray, np.ndarray]:
    common = {"store": str(store), "epochs": 1, "batch_size": 4, "seed": 0, "device": "cpu", "reduction_factor": 4,
              **kw}
    train(TrainConfig(out=str(tmp_path / "cached"), **common))
    train(TrainConfig(out=str(tmp_path / "online"), online=True, **common))
    return losses(tmp_path / "cached"), losses(tmp_path / "online")


def test_t5_encoder_and_decoder_states_compress(tiny_t5, tmp_path):
    data = tmp_path / "data"
    for name, rows in (("train", [("card lost", "a"), ("fee charged", "b")] * 6), ("dev", [("card", "a"), ("fee", "b")])):
        write_tsv(data / f"{name}.tsv", rows)
    out = tmp_path / "t5"
    extract(config(tiny_t5, data, out))
    store = open_store(out)
    assert set(store.bases) == {"", "dec"} and store.manifest["parts"]["dec"]["components"] == K
    assert store.split("dev").part("dec").stored_width == K
    a, b = cached_and_online(out, tmp_path)
    np.testing.assert_allclose(a, b, rtol=1e-4)


def tiny_vit(path: Path) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_image_stores_compress(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("dev", 2)):
        for label in ("a", "b"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "img"
    extract(config(tiny_vit(tmp_path / "vit"), tmp_path / "images", out, max_length=128))
    assert open_store(out).split("train").stored_width == K
    a, b = cached_and_online(out, tmp_path)
    np.testing.assert_allclose(a, b, rtol=1e-4)
    from featcache.errors import LstError
    from sidetrain import LadderModel

    with pytest.raises(LstError, match="built for encoder runs"):  # live projection: encoder runs only, one line
        LadderModel.from_pretrained(tmp_path / "cached")


def test_vision_language_stores_compress_both_parts(tiny_bert, tmp_path):
    data = easy_vqa_dataset(tmp_path / "vqa", train_images=3, test_images=1)
    out = tmp_path / "vl"
    extract(config(tiny_bert, data, out, image_model=str(tiny_vit(tmp_path / "vit"))))
    store = open_store(out)
    assert set(store.bases) == {"", "images"} and store.split("train").part("images").stored_width == K
    a, b = cached_and_online(out, tmp_path)
    np.testing.assert_allclose(a, b, rtol=1e-4)


def test_device_batches_rebuild_on_the_device_as_the_host_reader_does(compressed):
    from sidetrain.data import CachedBatches, DeviceBatches

    split = open_store(compressed).split("dev")
    device = DeviceBatches(split, None, torch.device("cpu"))  # the GPU path, run on the CPU
    assert device.values.shape[-1] == K and device.device_bytes < split.n_tokens * 3 * 32 * 4
    idx = np.array([3, 0, 7])
    torch.testing.assert_close(device(idx).hidden, CachedBatches(split, None)(idx).hidden)


def test_a_full_extraction_over_a_compressed_store_is_refused(compressed, tiny_bert, tiny_dataset):
    with pytest.raises(StoreError, match="components"):
        extract(config(tiny_bert, tiny_dataset, compressed, components=None))
