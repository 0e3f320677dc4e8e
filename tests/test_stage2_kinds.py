"""Stage 2's store kinds as plug-ins: the registry, the shared loop knowing no kind, and what each kind
brings to `lst sweep` and to the metric the best epoch is picked on (a T5 store of a dataset named CoLA).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import assert_user_error, invoke, synthetic_rows, torch_threads, write_tsv
from test_t5 import tiny_t5  # noqa: F401 - a fixture: the tiny random T5 with the MiniLM tokenizer

from featcache import ExtractConfig, extract, open_store
from featcache.errors import StoreError, SweepError
from sidetrain import TrainConfig, train
from sidetrain.kinds.registry import SearchFacts, StoreKind, kind_for, kind_names, register_kind

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def cola_t5_store(tiny_t5, tmp_path_factory) -> Path:  # noqa: F811 - the imported fixture
    """A T5 store of a binary task whose dataset folder is named CoLA (GLUE's metric: Matthews)."""
    data = tmp_path_factory.mktemp("glue") / "CoLA"
    for name, n, seed in (("train", 24, 1), ("dev", 8, 2)):
        write_tsv(data / f"{name}.tsv", [(text, label[-1]) for text, label in synthetic_rows(n, seed, labels=2)])
    out = tmp_path_factory.mktemp("cola_t5") / "store"
    extract(ExtractConfig(model=str(tiny_t5), dataset=str(data), out=str(out), store_dtype="fp32", max_length=16,
                          batch_size=8, device="cpu"))
    return out


def test_registry_finds_each_kind_and_refuses_unknown_ones():
    assert {"encoder", "seq2seq"} <= set(kind_names())
    assert kind_for({"kind": "seq2seq"}).name == "seq2seq" and kind_for({"kind": "encoder"}).name == "encoder"
    # stores written before the manifest recorded its kind
    assert kind_for({"seq2seq": {}}).name == "seq2seq" and kind_for({}).name == "encoder"
    with pytest.raises(StoreError, match="store kind among"):
        kind_for({"kind": "image"})
    with pytest.raises(ValueError, match="already registered"):
        register_kind("encoder", StoreKind())


def test_a_new_kind_plugs_in_without_touching_the_loop(tiny_store, tmp_path):
    """A kind registered from outside sidetrain is what `lst train` runs for a store that names it."""
    encoder = kind_for({"kind": "encoder"})
    calls = []

    class Toy(StoreKind):
        def recipe(self, cfg, store, device, eval_name):
            calls.append(eval_name)
            return encoder.recipe(cfg, store, device, eval_name)

        def search_facts(self, manifest):
            return SearchFacts(32, 4, (4,), "are 4", (1, 2), stackable=False)

    register_kind("toy", Toy())
    store = open_store(tiny_store)
    store.manifest = {**store.manifest, "kind": "toy"}
    summary = train(TrainConfig(store=str(tiny_store), out=str(tmp_path / "run"), epochs=1, reduction_factor=4,
                                device="cpu"), store=store)
    assert calls == ["dev"] and summary["steps"] > 0


def test_the_shared_modules_ask_no_kind():
    """train.py, recipe.py and the search import no kind's package, nor test a manifest for one."""
    for path in ["sidetrain/train.py", "sidetrain/recipe.py", "sidetrain/probe.py", "sidetrain/run_files.py",
                 *(str(p.relative_to(ROOT)) for p in (ROOT / "sidetrain" / "search").glob("*.py"))]:
        source = (ROOT / path).read_text()
        imported = [n.module or "" for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imported if "encoder" in m or "seq2seq" in m], path
        assert '"seq2seq" in' not in source, path


def test_t5_runs_pick_the_best_epoch_by_the_dataset_metric(cola_t5_store, tmp_path):
    summary = train(TrainConfig(store=str(cola_t5_store), out=str(tmp_path / "run"), epochs=1, batch_size=8,
                                reduction_factor=4, device="cpu"))
    assert summary["metric"] == "matthews"  # as the encoder recipe and `lst sweep` over the same store
    assert json.loads((tmp_path / "run" / "config.json").read_text())["metric"] == "matthews"


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
