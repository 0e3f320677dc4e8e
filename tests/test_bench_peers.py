"""benchmarks/bench_peers.py's parts that need no training: the RSS sampler, the batches, the table writer."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_peers import GLUE, markdown, parse_args, plot, prepare_data
from common import run_measured
from peers_finetune import bucketed_batches


def test_run_measured_sees_the_child_s_anonymous_memory_and_the_loaded_marker():
    code = ("import time; import numpy as np; print('LOADED', flush=True); time.sleep(1.0); "
            "a = np.ones(30_000_000); time.sleep(0.5); print(a.sum())")
    m = run_measured([sys.executable, "-c", code])
    assert m["rc"] == 0 and "30000000.0" in m["stdout"]
    assert m["peak_rss_anon_bytes"] > 200 * 2**20  # 240 MB of float64 ones
    assert m["rss_when_loaded_bytes"] < m["peak_rss_bytes"] - 200 * 2**20


def test_bucketed_batches_cover_every_row_once_with_similar_lengths_together():
    lengths = np.random.default_rng(0).integers(1, 64, 1000)
    batches = bucketed_batches(lengths, 32, random.Random(0))
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 20  # random batches of 32 would span ~55 tokens


def _row(method: str, kind: str, dev: float, **extra) -> dict:
    return {"method": method, "kind": kind, "epochs": 3, "splits": {"dev": {"accuracy": dev}, "test": {"accuracy": dev}},
            "per_epoch_eval": [dev / 2, dev], "seconds_per_epoch": 1.5, "wall_seconds": 10.0,
            "peak_rss_anon_bytes": 2**29, "peak_rss_file_bytes": 2**27, "peak_above_loaded_bytes": 2**26,
            "trainable_parameters": 1234, **extra}


def test_markdown_and_plot_name_every_method_and_the_equal_budget_row(tmp_path):
    args = parse_args(["--quick"])
    rows = {"lora_a": _row("lora_a", "peer", 0.9, lr=2e-3, lora={"r": 8}),
            "lst_cached": _row("lst_cached", "lst", 0.8),
            "lst_sweep": _row("lst_sweep", "lst", 0.85, trials_finished=4, counts={"COMPLETE": 4},
                              best_params={"lr": 0.01})}
    results = {"backbone": "tiny", "backbone_short": "bert 6L", "tasks": {"banking77": {
        "metric": "accuracy", "rows": {"train": 300}, "methods": rows,
        "extract": {"seconds": 3.0, "peak_rss_anon_bytes": 2**28},
        "equal_budget": {"lora": "lora_a", "budget_seconds": 10.0, "sweep_seconds_in_budget": 7.0,
                         "trials_finished": 2, "trials_complete": 2, "best_eval": 0.84,
                         "best_splits": {"dev": {"accuracy": 0.84}, "test": {"accuracy": 0.83}},
                         "best_params": {"lr": 0.01}, "metric": "accuracy"}}}}
    text = markdown(results, args)
    for want in ("LoRA r=8 lr 0.002", "LST from the store", "LST, best of sweep", "Equal budget", "0.8400", "0.8300"):
        assert want in text
    plot(results, tmp_path / "peers.png")
    assert (tmp_path / "peers.png").stat().st_size > 10_000


@pytest.mark.skipif(not (GLUE / "CoLA").exists(), reason="GLUE is not beside the project (../shared/data/glue)")
def test_headerless_cola_is_written_with_a_header_lst_reads(tmp_path):
    """GLUE's CoLA TSVs have no header row: the subset gets one, so `lst extract` finds the text column."""
    from featcache.text.sources import Quoting, load_dataset_path

    folder, quoting, rows = prepare_data("cola", tmp_path, 50, 0)
    assert folder.name == "CoLA" and rows["train"] == 50  # the folder name picks GLUE's metric (Matthews)
    data = load_dataset_path(folder, Quoting(quoting))
    train = data.splits["train"].frame
    assert list(train.columns) == ["source", "label", "original_label", "sentence"] and len(train) == 50
    assert set(train["label"].astype(str)) <= {"0", "1"} and rows["dev"] == len(data.splits["dev"].frame)


@pytest.mark.skipif(not (GLUE / "MRPC").exists(), reason="GLUE is not beside the project (../shared/data/glue)")
def test_a_subset_keeps_rows_with_quotes_and_reads_back_exactly(tmp_path):
    """MRPC's texts hold quote characters (85 of 408 dev rows): the subset keeps every row, CSV-quoted."""
    from featcache.text.sources import Quoting, load_dataset_path

    folder, quoting, rows = prepare_data("mrpc", tmp_path, 100, 0)
    original = load_dataset_path(GLUE / "MRPC", Quoting("none")).splits["dev"].frame.astype(str)
    back = load_dataset_path(folder, Quoting(quoting)).splits["dev"].frame.astype(str)
    assert rows == {"train": 100, "dev": len(original)} and (back.values == original.values).all()
    assert original.apply(lambda c: c.str.contains('"')).any(axis=1).sum() > 0  # the case this is about
