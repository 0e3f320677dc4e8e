"""One multi-task side network over several stores (`lst train STORE STORE ... --out RUN`, sidetrain/multitask.py):
shared parameters, per-task run folders and metrics, task sampling, resume, `lst predict --task`, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_user_error, invoke, synthetic_rows, torch_threads, write_tsv

from featcache import ExtractConfig, extract
from featcache.errors import LstError
from sidetrain import LadderModel, TrainConfig, train
from sidetrain import multitask as MT

CPU = torch.device("cpu")
KW = {"batch_size": 16, "reduction_factor": 4, "device": "cpu", "seed": 0}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):  # tiny matmuls: one thread is faster on a shared CPU, and every run does the same sums
        yield


def dataset(root: Path, n: int, n_dev: int, labels: int, seed: int) -> Path:
    write_tsv(root / "train.tsv", synthetic_rows(n, seed, labels))
    write_tsv(root / "dev.tsv", synthetic_rows(n_dev, seed + 1, labels))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mt_data")
    return {"three": dataset(root / "three", 120, 30, 3, 1), "two": dataset(root / "two", 80, 24, 2, 7)}


def store_of(model: Path, data: Path, out: Path, **kw) -> Path:
    extract(ExtractConfig(model=str(model), dataset=str(data), out=str(out), store_dtype="fp32", max_length=16,
                          device="cpu", **kw))
    return out


@pytest.fixture(scope="module")
def bert_stores(tiny_bert, data, tmp_path_factory) -> list[Path]:
    """Two encoder tasks over one backbone: 3 and 2 labels (the heads differ, the body is shared)."""
    root = tmp_path_factory.mktemp("mt_bert")
    return [store_of(tiny_bert, data[n], root / f"{n}.zarr") for n in ("three", "two")]


@pytest.fixture(scope="module")
def t5_stores(tiny_t5, data, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("mt_t5")
    return [store_of(tiny_t5, data[n], root / f"{n}.zarr", batch_size=8) for n in ("three", "two")]


@pytest.fixture(scope="module")
def bert_run(bert_stores, tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("mt_runs") / "run"
    return run, train(TrainConfig(store=[str(s) for s in bert_stores], out=str(run), epochs=4, **KW))


def losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (path / "train_log.jsonl").read_text().splitlines()]


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_encoder_tasks_share_the_body_not_the_heads(bert_stores, tmp_path):
    cfg = TrainConfig(store=[str(s) for s in bert_stores], out=str(tmp_path / "r"), **KW)
    tasks = MT.build_tasks(cfg, MT.open_stores(cfg), CPU, tmp_path / "r")
    assert [t.name for t in tasks] == ["three", "two"]
    a, b = (dict(t.recipe.model.named_parameters()) for t in tasks)
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].shape != b[k].shape]
    assert differ and all(a[k] is not b[k] for k in differ)  # the classifier over 3 vs 2 labels: each its own
    assert all(a[k] is b[k] for k in a if k not in differ)  # everything else: one object
    joint = MT.joint_model(tasks)
    assert sum(p.numel() for p in joint.parameters()) == (sum(p.numel() for p in a.values())
                                                          + sum(b[k].numel() for k in differ))
    assert not (tmp_path / "r").exists()  # building writes nothing


def test_encoder_run_trains_both_tasks_and_writes_a_run_per_task(bert_run, bert_stores):
    run, summary = bert_run
    assert summary["metric"] == "task_mean" and set(summary["tasks"]) == {"three", "two"}
    history = summary["history"]
    for name, chance in (("three", 1 / 3), ("two", 1 / 2)):
        t = summary["tasks"][name]
        per_epoch = [h["tasks"][name] for h in history]
        assert per_epoch[-1]["train_loss"] < per_epoch[0]["train_loss"] * 0.8, per_epoch  # both tasks learn
        assert t["splits"]["dev"]["accuracy"] > chance + 0.25, t
        assert t["metric"] == "accuracy" and t["best_eval"] == t["splits"]["dev"]["accuracy"]
        folder = run / "tasks" / name
        assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "metrics.json",
                                                      "predictions.json", "train_log.jsonl"}
        own = read(folder / "metrics.json")  # a plain run's metrics.json, this task's view of the run
        assert own["metric"] == "accuracy" and own["splits"] == t["splits"]
        assert [h["train_loss"] for h in own["history"]] == [h["train_loss"] for h in per_epoch]
        assert read(folder / "predictions.json") == read(run / "predictions.json")[name]
        config = read(folder / "config.json")
        assert config["store"] == str(bert_stores[0 if name == "three" else 1]) and config["multitask"]["tasks"]
        assert len(losses(folder)) == t["steps"] == own["steps"] < summary["steps"]
    mean = np.mean([summary["tasks"][n]["splits"]["dev"]["accuracy"] for n in ("three", "two")])
    assert summary["splits"]["dev"]["task_mean"] == pytest.approx(mean)
    assert summary["best_eval"] == max(h["eval_task_mean"] for h in history)
    assert summary["tasks"]["two"]["own_parameters"] < summary["shared_parameters"]
    config = read(run / "config.json")
    assert config["store"] == [str(s) for s in bert_stores] and set(config["tasks"]) == {"three", "two"}
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert {e["task"] for e in log} == {"three", "two"} and len(log) == summary["steps"]
    # each task's folder loads as any run; the whole run points at them in one line
    model = LadderModel.from_pretrained(run / "tasks" / "two", device="cpu")
    assert model.label_names == ["class_0", "class_1"]
    with pytest.raises(LstError, match="multi-task run .tasks: three, two"):
        LadderModel.from_pretrained(run)


def test_t5_tasks_share_everything(t5_stores, tmp_path, data):
    cfg = TrainConfig(store=[str(s) for s in t5_stores], out=str(tmp_path / "r"), epochs=2, **KW)
    tasks = MT.build_tasks(cfg, MT.open_stores(cfg), CPU, tmp_path / "r")
    a, b = (t.recipe.model for t in tasks)
    assert all(p is q for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert a.lm_head is b.lm_head  # the frozen LM head: one buffer
    summary = train(cfg)
    assert summary["tasks"]["two"]["own_parameters"] == summary["tasks"]["three"]["own_parameters"] == 0
    assert summary["shared_parameters"] == summary["trainable_parameters"]
    assert set(summary["tasks"]["two"]["splits"]["dev"]) >= {"accuracy", "f1"}  # scored on its own label texts
    folder = tmp_path / "r" / "tasks" / "two"
    model = LadderModel.from_pretrained(folder, device="cpu")
    texts = pd.read_csv(data["two"] / "dev.tsv", sep="\t")["text"].astype(str).tolist()
    cached = read(folder / "predictions.json")["dev"]
    assert model.predict(texts) == [model.label_names[i] for i in cached]  # live backbone == the cache


class Split(SimpleNamespace):
    pass


def fake_tasks(*sizes: int) -> list:
    return [SimpleNamespace(train_split=Split(lengths=np.arange(n) % 7 + 1)) for n in sizes]


def test_task_sampling_draw_counts():
    tasks, bs = fake_tasks(100, 20, 5), 4  # 25, 5 and 2 batches
    for epoch in range(3):
        prop = MT.epoch_plan(tasks, bs, 0, epoch, "proportional")
        assert np.bincount([k for k, _ in prop]).tolist() == [25, 5, 2]
        for i, n in enumerate((100, 20, 5)):  # every example of every task once per epoch
            assert sorted(np.concatenate([idx for k, idx in prop if k == i]).tolist()) == list(range(n))
        uni = MT.epoch_plan(tasks, bs, 0, epoch, "uniform")
        counts = np.bincount([k for k, _ in uni])
        assert len(uni) == len(prop) == 32 and counts.max() - counts.min() <= 1 and counts.sum() == 32
        assert [k for k, _ in prop] != sorted(k for k, _ in prop)  # interleaved, not task after task
    again = MT.epoch_plan(tasks, bs, 0, 2, "uniform")  # the last epoch above
    assert [(k, idx.tolist()) for k, idx in again] == [(k, idx.tolist()) for k, idx in uni]  # seeded
    one = MT.epoch_plan(tasks[:1], bs, 0, 0, "uniform")  # one task: its own batches, as a single-store run
    assert [k for k, _ in one] == [0] * 25


def test_uniform_run_and_resume_equal_an_uninterrupted_run(bert_stores, tmp_path):
    stores = [str(s) for s in bert_stores]
    common = {**KW, "store": stores, "epochs": 3, "task_sampling": "uniform"}
    full = train(TrainConfig(out=str(tmp_path / "full"), **common))
    steps = {n: t["steps"] for n, t in full["tasks"].items()}
    assert abs(steps["three"] - steps["two"]) <= 3 and sum(steps.values()) == full["steps"] == 3 * (8 + 5)

    class Killed(Exception):
        pass

    def kill_after_two(epoch: int, record: dict) -> None:
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        train(TrainConfig(out=str(tmp_path / "killed"), **common), on_epoch=kill_after_two)
    assert (tmp_path / "killed" / "checkpoint.pt").is_file() and not (tmp_path / "killed" / "metrics.json").exists()
    resumed = train(TrainConfig(out=str(tmp_path / "killed"), **common))
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")
    assert resumed["splits"] == full["splits"] and resumed["tasks"]["two"]["steps"] == steps["two"]
    assert read(tmp_path / "killed" / "predictions.json") == read(tmp_path / "full" / "predictions.json")
    # another sampling is another run: refused in one line, nothing overwritten
    r = invoke("train", *stores, "--out", tmp_path / "full", "--batch-size", 16, "--reduction-factor", 4,
               "--device", "cpu", "--epochs", 3)
    assert_user_error(r, "task_sampling")


def test_predict_with_task_equals_the_cached_predictions(bert_run, data, tmp_path):
    run, _ = bert_run
    texts = pd.read_csv(data["three"] / "dev.tsv", sep="\t")["text"].astype(str).tolist()
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    r = invoke("predict", run, tmp_path / "in.txt", "--task", "three", "--device", "cpu")
    assert r.exit_code == 0, r.output
    got = [line.split("\t")[0] for line in r.output.splitlines() if "\t" in line]
    names = read(run / "tasks" / "three" / "config.json")["store_manifest"]["task"]["label_names"]
    assert got == [names[i] for i in read(run / "predictions.json")["three"]["dev"]]
    assert_user_error(invoke("predict", run, "--text", "hi"), "--task NAME", "tasks: three, two")
    assert_user_error(invoke("predict", run, "--text", "hi", "--task", "four"), "--task one of three, two")
    assert_user_error(invoke("predict", run / "tasks" / "two", "--text", "hi", "--task", "two"), "Drop --task")


def test_cli_trains_several_stores(bert_stores, tmp_path):
    r = invoke("train", *bert_stores, "--out", tmp_path / "r", "--epochs", 1, "--batch-size", 16,
               "--reduction-factor", 4, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "task_mean" in r.output and "three" in r.output and "two" in r.output
    assert (tmp_path / "r" / "tasks" / "two" / "model.safetensors").is_file()


def test_bad_input_is_one_line_and_writes_nothing(bert_stores, t5_stores, tiny_bert, data, tmp_path):
    three, two = bert_stores
    other = tmp_path / "other_bert"  # a copy of the same weights elsewhere: another backbone name
    shutil.copytree(tiny_bert, other)
    renamed = store_of(other, data["two"], tmp_path / "renamed.zarr")
    from transformers import BertModel  # the same name, other weights: another revision

    torch.manual_seed(1)
    BertModel(BertModel.config_class.from_pretrained(other)).save_pretrained(other)
    retrained = store_of(other, data["two"], tmp_path / "retrained.zarr")
    dropped = store_of(tiny_bert, data["two"], tmp_path / "dropped.zarr", layers=[0, 2])
    out = tmp_path / "run"
    cases = [((three, t5_stores[1]), (), ("stores of one kind", "three: encoder", "two: seq2seq")),
             ((three, renamed), (), ("stores of one backbone", "the same name", "renamed:")),
             ((renamed, retrained), (), ("stores of one backbone", "the same revision", "retrained:")),
             ((three, dropped), (), ("the same kept layers", "--layers")),
             ((three, two), ("--head", "probe"), ("--head lst for a multi-task run",)),
             ((three, f"{three}/"), (), ("different stores", "a second time")),
             ((three, tmp_path / "nope.zarr"), (), ("nope.zarr",))]
    for stores, extra, words in cases:
        r = invoke("train", *stores, "--out", out, "--device", "cpu", "--epochs", 1, *extra)
        assert_user_error(r, *words)
        assert r.output.count("Error:") == 1
        assert not out.exists(), words
    # layer dropping to layers every store holds makes the same two stores one run
    r = invoke("train", three, dropped, "--out", out, "--device", "cpu", "--epochs", 1, "--layers", 2,
               "--reduction-factor", 4)
    assert r.exit_code == 0, r.output


def test_task_sampling_choices_follow_the_library():
    import cli
    from sidetrain.config import TASK_SAMPLINGS

    assert [e.value for e in cli.TaskSampling] == list(TASK_SAMPLINGS)
    with pytest.raises(LstError, match="--task-sampling one of proportional, uniform"):
        TrainConfig(store=["a", "b"], out="r", task_sampling="random")
    assert TrainConfig(store=["a"], out="r").store == "a"  # one store: the plain run


def test_sharing_refuses_a_network_that_keeps_a_weight_elsewhere():
    class Net(torch.nn.Module):
        def __init__(self, labels: int, alias: bool = False) -> None:
            super().__init__()
            self.body, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, labels)
            self.register_buffer("table", torch.arange(4.0))
            self.alias = self.body.weight if alias else None  # read outside the registered slot

    a, b = Net(3), Net(2)
    assert MT.share_parameters([a, b]) == 3  # body weight and bias, the equal buffer; not the heads
    assert b.body.weight is a.body.weight and b.table is a.table and b.head.weight is not a.head.weight
    with pytest.raises(LstError, match="task 1: body.weight still referenced elsewhere"):
        MT.share_parameters([Net(3), Net(3, alias=True)])
