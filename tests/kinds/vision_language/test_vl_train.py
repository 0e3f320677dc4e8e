"""Vision-language training (#13): the side network (image tokens as a side prefix, no ladder input at the
visual positions), cached == online in fp32 (tiny random backbones, and the bundled MiniLM + EfficientNet-Lite0
on a few rows), the question-only probe, resume after kill -9, lst predict with --image, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, invoke, torch_threads
from transformers import BertConfig

from featcache import ExtractConfig, extract, open_store
from featcache.bundled import easy_vqa_dataset
from sidetrain import TrainConfig, train
from sidetrain.kinds.vision_language.model import VisionLanguageSide
from sidetrain.kinds.vision_language.probe import floors
from sidetrain.networks.ladders import GATE_TEMPERATURE
from sidetrain.networks.side_config import SideConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_side(**kw) -> VisionLanguageSide:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    side = SideConfig(**{"num_outputs": 5, "stored_layers": [0, 1, 2], "kept_layers": [1, 2], "reduction_factor": 4,
                         "dropout": 0.0, "attention_dropout": 0.0, "pooling": "mean", "num_heads": None, "top": "side", **kw})
    return VisionLanguageSide(config, image_width=24, image_tokens=6, side=side).eval()


def test_visual_positions_get_no_ladder_input():
    model = tiny_side()
    with torch.no_grad():
        model.text.ladders.alpha.copy_(torch.tensor([0.05, -0.1]))  # gates away from 0.5: the test sees them
    torch.manual_seed(1)
    hidden, image = torch.randn(3, 7, 3, 32), torch.randn(3, 6, 1, 24)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:] = False
    inputs, outputs = [], []
    for block in model.text.blocks:
        block.register_forward_pre_hook(
            lambda m, a, k: inputs.append((a[0] if a else k["hidden_states"]).detach()), with_kwargs=True)
        block.register_forward_hook(lambda m, a, o: outputs.append((o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        model(hidden, mask, image)
        before = [model.visual(image[:, :, 0])] + outputs[:-1]  # the side stream entering each mix
        gates = torch.sigmoid(model.text.ladders.alpha / GATE_TEMPERATURE)
        _, ladders, _ = model.text.ladders(hidden)
    text_start = model.text.ladders.embed(hidden[:, :, 0])
    for j, (got, prev) in enumerate(zip(inputs, before)):
        # visual positions (the 6 in front): the gate scales the side stream, no ladder term is added
        torch.testing.assert_close(got[:, :6], gates[j] * prev[:, :6], rtol=1e-6, atol=1e-6)
        # text positions: mu * s + (1 - mu) * ladder_j, as in the encoder side network
        stream = text_start if j == 0 else prev[:, 6:]
        torch.testing.assert_close(got[:, 6:], gates[j] * stream + (1 - gates[j]) * ladders[:, :, j],
                                   rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ from real stores

def losses(run: Path) -> np.ndarray:
    return np.array([json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()])


@pytest.fixture(scope="module")
def easy_vqa_small(tmp_path_factory) -> Path:
    """easy-VQA's real PNGs and questions: 9 train images (~90 questions), 1 dev, 3 test."""
    return easy_vqa_dataset(tmp_path_factory.mktemp("easy_vqa"), train_images=10, test_images=3)


def vl_extract(model, image_model, data, out: Path, **kw) -> Path:
    with torch_threads(1):  # module fixtures run before the one_thread fixture
        extract(ExtractConfig(model=str(model), dataset=str(data), image_model=str(image_model), out=str(out),
                              store_dtype="fp32", max_length=16, device="cpu", error_sample=2, **kw))
    return out


@pytest.fixture(scope="module")
def tiny_store(tiny_bert, tiny_vit, easy_vqa_small, tmp_path_factory) -> Path:
    return vl_extract(tiny_bert, tiny_vit, easy_vqa_small, tmp_path_factory.mktemp("vl") / "store")


@pytest.fixture(scope="module")
def text_store(tmp_path_factory, tiny_bert, tiny_dataset) -> Path:
    out = tmp_path_factory.mktemp("text") / "store"
    with torch_threads(1):
        extract(ExtractConfig(model=str(tiny_bert), dataset=str(tiny_dataset), out=str(out), store_dtype="fp32",
                              max_length=16, device="cpu", error_sample=2))
    return out


def vl_cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = {"store": str(store), "out": str(out), "epochs": 2, "batch_size": 8, "reduction_factor": 4,
            "dropout": 0.0, "device": "cpu", "seed": 3, "resume": False}
    return TrainConfig(**{**base, **kw})


def assert_cached_equals_online(store: Path, tmp_path: Path, **kw) -> None:
    runs = {online: tmp_path / f"online{online}" for online in (False, True)}
    summaries = {online: train(vl_cfg(store, run, online=online, **kw)) for online, run in runs.items()}
    np.testing.assert_allclose(losses(runs[False]), losses(runs[True]), rtol=1e-5)
    preds = [json.loads((runs[o] / "predictions.json").read_text()) for o in (False, True)]
    assert preds[0] == preds[1]
    assert summaries[False]["mode"] == "cached" and summaries[True]["mode"] == "online"


def test_cached_training_equals_online_training(tiny_store, tmp_path):
    assert_cached_equals_online(tiny_store, tmp_path)
    assert len(losses(tmp_path / "onlineFalse")) == 2 * -(-len(open_store(tiny_store).split("train")) // 8)


def test_cached_equals_online_with_the_bundled_minilm_and_efficientnet(minilm, tmp_path):
    data = easy_vqa_dataset(tmp_path / "data", train_images=3, test_images=1)  # 2 train images, ~20 questions
    store = vl_extract(minilm, "efficientnet-lite0", data, tmp_path / "store")
    assert open_store(store).manifest["kind"] == "vision_language"
    assert_cached_equals_online(store, tmp_path, epochs=1)


def test_probe_floor_predict_and_rows_files(tiny_store, easy_vqa_small, tmp_path):
    result = invoke("train", tiny_store, "--out", tmp_path / "probe", "--head", "probe")  # question-only floor
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "probe" / "metrics.json").read_text())["head"] == "probe"
    found = floors(open_store(tiny_store))
    assert set(found) == {"question_only", "image_only"} and set(found["image_only"]) == {"dev", "test"}
    run = tmp_path / "lst"
    train(vl_cfg(tiny_store, run))
    rows = [json.loads(line) for line in (easy_vqa_small / "test.jsonl").read_text().splitlines()]
    stored = json.loads((run / "predictions.json").read_text())["test"]
    names = open_store(tiny_store).manifest["task"]["label_names"]
    result = invoke("predict", run, easy_vqa_small / "test.jsonl", "--device", "cpu")  # a rows file
    assert result.exit_code == 0, result.output
    got = [line.split("\t") for line in result.output.strip().splitlines()[-len(rows):]]
    assert [g[0] for g in got] == [names[i] for i in stored]  # both backbones live == the store
    assert [g[2] for g in got] == [r["question"] for r in rows]
    first = rows[0]
    result = invoke("predict", run, "--text", first["question"], "--text", rows[1]["question"],
                    "--image", first["image"], "--device", "cpu")  # one image for every question
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-2].split("\t")[0] == names[stored[0]]


SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
from sidetrain import TrainConfig, train
train(TrainConfig(store=sys.argv[1], out=sys.argv[2], epochs=int(sys.argv[3]), batch_size=8, reduction_factor=4,
                  device="cpu", seed=2))
"""


def test_resume_after_kill_9_equals_uninterrupted(tiny_store, tmp_path):
    epochs = 6
    full = train(TrainConfig(store=str(tiny_store), out=str(tmp_path / "full"), epochs=epochs, batch_size=8,
                             reduction_factor=4, device="cpu", seed=2))
    run, script = tmp_path / "killed", tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_store), str(run), str(epochs)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists(), "the run finished before the kill; make it longer"
    resumed = train(TrainConfig(store=str(tiny_store), out=str(run), epochs=epochs, batch_size=8,
                                reduction_factor=4, device="cpu", seed=2))
    np.testing.assert_array_equal(losses(run), losses(tmp_path / "full"))
    assert resumed["splits"] == full["splits"]


def test_bad_inputs_are_one_line_errors(tiny_store, text_store, tmp_path):
    store = tmp_path / "no_images"
    shutil.copytree(tiny_store, store)
    for split in ("train", "dev", "test"):
        shutil.rmtree(store / split / "images")
    assert_user_error(invoke("train", store, "--out", tmp_path / "r"), "image tokens", "--image-model")
    run = tmp_path / "lst"
    train(vl_cfg(tiny_store, run, epochs=1))
    assert_user_error(invoke("predict", run, "--text", "what shape is it?"), "--image")
    assert_user_error(invoke("predict", run, "--image", "a.png"), "--text")
    text_run = tmp_path / "text"
    train(TrainConfig(store=str(text_store), out=str(text_run), epochs=1, device="cpu"))
    assert_user_error(invoke("predict", text_run, "--text", "hi", "--image", "a.png"), "vision-language")
    assert_user_error(invoke("train", tiny_store, "--out", tmp_path / "p", "--init", "pruned"), "--init random")


def test_sweep_runs_unstacked_on_a_vl_store(tiny_store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 1.0e-3, high: 1.0e-2, log: true}\nreduction_factor: [4, 8]\nepochs: 1\n")
    result = invoke("sweep", tiny_store, "--out", tmp_path / "sweep", "--trials", 2, "--space", space,
                    "--device", "cpu", "--threads", 1)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert summary["best"] is not None and (tmp_path / "sweep" / "best" / "model.safetensors").exists()


def test_a_t5_vl_store_trains_the_vl_t5_network():
    """A store whose text part is a T5's goes to the VL-T5 recipe (tests/kinds/vision_language/test_vl_t5.py)."""
    from sidetrain.kinds.vision_language.recipe import has_t5_text

    assert has_t5_text({"seq2seq": {}, "backbone": {"config": {"model_type": "t5", "is_encoder_decoder": True}}})
    assert not has_t5_text({"backbone": {"config": {"model_type": "bert", "is_encoder_decoder": False}}})
