"""Stage 2's store kinds as plug-ins: the registry, the shared loop knowing no kind, and what each kind
brings to `lst sweep` and to the metric the best epoch is picked on (a T5 store of a dataset named CoLA).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import assert_user_error, invoke, synthetic_rows, torch_threads, write_tsv

from featcache import ExtractConfig, extract, open_store
from featcache.errors import LstError, StoreError, SweepError
from featcache.kinds import ExtractKind, register_kind, registered_kinds
from featcache.kinds.encoder.kind import EncoderExtractKind
from sidetrain import TrainConfig, train
from sidetrain.kinds import SearchFacts, TrainKind, kind_for, kind_names

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def cola_t5_store(tiny_t5, tmp_path_factory) -> Path:
    """A T5 store of a binary task whose dataset folder is named CoLA (GLUE's metric: Matthews)."""
    data = tmp_path_factory.mktemp("glue") / "CoLA"
    for name, n, seed in (("train", 24, 1), ("dev", 8, 2)):
        write_tsv(data / f"{name}.tsv", [(text, label[-1]) for text, label in synthetic_rows(n, seed, labels=2)])
    out = tmp_path_factory.mktemp("cola_t5") / "store"
    extract(ExtractConfig(model=str(tiny_t5), dataset=str(data), out=str(out), store_dtype="fp32", max_length=16,
                          batch_size=8, device="cpu"))
    return out


def test_registry_finds_each_kind_and_refuses_unknown_ones():
    assert {"encoder", "seq2seq", "image", "vision_language"} <= set(kind_names())
    for name in kind_names():  # every registration names a train half that imports and says its name
        kind = kind_for({"kind": name})
        assert isinstance(kind, TrainKind) and kind.name == name
    # stores written before the manifest recorded its kind
    assert kind_for({"seq2seq": {}}).name == "seq2seq" and kind_for({}).name == "encoder"
    with pytest.raises(StoreError, match="store kind among"):
        kind_for({"kind": "audio"})  # a kind nobody registered
    with pytest.raises(ValueError, match="new, non-empty name"):
        register_kind(EncoderExtractKind(), train="sidetrain.kinds.encoder:TRAIN_KIND")

    class Clash(ExtractKind):
        name, precedence = "clash", 0  # the encoder's: detection would depend on import order

    with pytest.raises(ValueError, match="precedence 0 is 'encoder'"):
        register_kind(Clash(), train="sidetrain.kinds.encoder:TRAIN_KIND")


class ToyExtract(ExtractKind):
    name, precedence = "toy", -1

    def matches(self, cfg, config):
        return False  # never detected: a store only says it is one


class ToyTrain(TrainKind):
    def __init__(self) -> None:
        self.calls: list[str | None] = []

    def recipe(self, cfg, store, device, eval_name):
        self.calls.append(eval_name)
        return kind_for({"kind": "encoder"}).recipe(cfg, store, device, eval_name)

    def search_facts(self, manifest):
        return SearchFacts(32, 4, (4,), "are 4", (1, 2), stackable=False)


TOY = ToyTrain()


def test_a_new_kind_plugs_in_without_touching_the_loop(tiny_store, tmp_path):
    """A kind registered from outside lst (both halves, one registration) is what `lst train` runs for a store
    that names it."""
    if "toy" not in registered_kinds():
        register_kind(ToyExtract(), train=f"{__name__}:TOY")
    store = open_store(tiny_store)
    store.manifest = {**store.manifest, "kind": "toy"}
    summary = train(TrainConfig(store=str(tiny_store), out=str(tmp_path / "run"), epochs=1, reduction_factor=4,
                                device="cpu"), store=store)
    assert TOY.calls == ["dev"] and summary["steps"] > 0


def test_the_shared_modules_ask_no_kind():
    """The shared modules of both stages import no kind's folder, nor test a manifest for one; no kind imports a
    sibling kind (each registered kind, in both stages)."""
    kinds = set(registered_kinds()) - {"toy"}
    shared = [p for pkg in ("featcache", "sidetrain") for p in (ROOT / pkg).rglob("*.py") if "kinds" not in p.parts]
    for path in shared:
        source = path.read_text()
        imported = [n.module or "" for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imported for k in kinds if f"kinds.{k}" in m or m == k], path
        # older manifests are told apart in one place only (featcache/manifest.py)
        assert '"seq2seq" in' not in source or path == ROOT / "featcache" / "manifest.py", path
    for kind in kinds:
        for stage in ("featcache", "sidetrain"):
            for path in (ROOT / stage / "kinds" / kind).rglob("*.py"):
                tree = ast.parse(path.read_text())
                modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
                modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
                siblings = [m for m in modules for other in kinds - {kind}
                            if f"kinds.{other}" in m or m.lstrip(".").split(".")[0] == other and m.startswith("..")]
                assert not siblings, (path, siblings)


@pytest.fixture(scope="module")
def t5_run(cola_t5_store, tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("t5_run") / "run"
    return run, train(TrainConfig(store=str(cola_t5_store), out=str(run), epochs=1, batch_size=8, reduction_factor=4,
                                  device="cpu"))


def test_t5_runs_pick_the_best_epoch_by_the_dataset_metric(t5_run):
    run, summary = t5_run
    assert summary["metric"] == "matthews"  # as the encoder recipe and `lst sweep` over the same store
    assert json.loads((run / "config.json").read_text())["metric"] == "matthews"


def test_predict_lines_dispatches_on_the_runs_kind(tiny_store, t5_run, tmp_path):
    from sidetrain.kinds.encoder.predict import Predictor
    from sidetrain.kinds.seq2seq import predict as t5_predict
    from sidetrain.predict import predict_lines

    texts = [text for text, _ in synthetic_rows(5, 7)]
    run = tmp_path / "run"
    train(TrainConfig(store=str(tiny_store), out=str(run), epochs=1, reduction_factor=4, device="cpu"))
    predictor = Predictor(run, "cpu")
    assert predict_lines(str(run), texts, device="cpu") == predictor.label_names(predictor.predict(texts))
    t5, _ = t5_run
    assert predict_lines(str(t5), texts, device="cpu") == t5_predict.predict_lines(t5, texts, device="cpu")
    assert len(predict_lines(str(t5), texts[:2], generate=True, device="cpu")) == 2
    with pytest.raises(LstError, match="generates text .*seq2seq.*Drop --generate"):
        predict_lines(str(run), texts, generate=True, device="cpu")
    with pytest.raises(LstError, match="finished run folder"):
        predict_lines(str(tmp_path / "nope"), texts)
    train(TrainConfig(store=str(tiny_store), out=str(tmp_path / "probe"), head="probe", device="cpu"))
    with pytest.raises(LstError, match="an LST run"):
        predict_lines(str(tmp_path / "probe"), texts)


def test_every_trainer_writes_the_same_run_files(tiny_store, tmp_path):
    """lst train, the linear probe and stacked trials: the same files, and metrics.json with the same keys."""
    from sidetrain.search.stacked import train_stacked

    kw = {"store": str(tiny_store), "device": "cpu", "epochs": 1, "reduction_factor": 4}
    runs = {"lst": train(TrainConfig(out=str(tmp_path / "lst"), **kw)),
            "probe": train(TrainConfig(out=str(tmp_path / "probe"), head="probe", **kw))}
    runs["stacked"] = train_stacked([TrainConfig(out=str(tmp_path / "stacked"), **kw),
                                     TrainConfig(out=str(tmp_path / "stacked2"), lr=1e-2, **kw)])[0]
    files = {name: {p.name for p in (tmp_path / name).iterdir()} - {"checkpoint.pt"} for name in runs}
    assert files["lst"] == files["probe"] == files["stacked"] == {
        "config.json", "metrics.json", "model.safetensors", "predictions.json", "train_log.jsonl"}
    keys = {name: set(json.loads((tmp_path / name / "metrics.json").read_text())) for name in runs}
    assert keys["lst"] == keys["probe"] == keys["stacked"] == set(runs["lst"])
    for name, summary in runs.items():
        assert {"epoch", "step", "seconds", "data_wait_fraction", "train_loss"} <= set(summary["history"][0]), name
        assert summary["head"] == ("probe" if name == "probe" else "lst") and summary["mode"] == "cached"
        assert summary["stacked_with"] == (2 if name == "stacked" else 1)


def test_sweep_on_a_t5_store(cola_t5_store, tmp_path):
    """The default space comes from the kind (T5 config keys, not BERT's); trials cannot be stacked."""
    from sidetrain.search.space import resolve_space
    from sidetrain.search.sweep import SweepConfig, run_sweep

    space = resolve_space(open_store(cola_t5_store).manifest, None)
    assert space["reduction_factor"].choices == (4, 8) and space["layers"].choices == ("all", "2")
    summary = run_sweep(SweepConfig(store=str(cola_t5_store), out=str(tmp_path / "sw"), trials=2, prune=False,
                                    space={"epochs": 1, "batch_size": 8}, device="cpu", threads=1, seed=0))
    assert summary["finished"] == 2 and summary["metric"] == "matthews"
    with pytest.raises(SweepError, match="--stack 1"):
        run_sweep(SweepConfig(store=str(cola_t5_store), out=str(tmp_path / "stacked"), trials=2, stack=2))
    assert_user_error(invoke("sweep", cola_t5_store, "--out", tmp_path / "cli", "--trials", 3, "--stack", 2),
                      "--stack 1")


def test_t5_decoder_rows_come_through_the_store_reader(cola_t5_store):
    """No zarr in stage 2: T5's decoder rows are a part of the split, read as the store's reader= says."""
    import numpy as np
    import torch

    from sidetrain.t5.data import CachedSeq2Seq, open_decoder

    idx = np.array([5, 0, 3])
    batches = {}
    for reader in ("shards", "zarr"):
        store = open_store(cola_t5_store, reader=reader)
        dec = open_decoder(store, "dev")
        assert dec.part.reader_kind == reader
        batches[reader] = CachedSeq2Seq(store.split("dev"), dec, preload=False)(idx)
    for name in ("enc_hidden", "dec_hidden", "dec_mask", "targets", "row_example"):
        assert torch.equal(getattr(batches["shards"], name), getattr(batches["zarr"], name)), name
