"""The `lst` command through typer's runner: exit codes, files, one-line errors for user mistakes."""

from __future__ import annotations

import json

from conftest import assert_user_error, invoke, write_tsv


def test_extract_then_train(tiny_bert, tiny_dataset, tmp_path):
    store, run = tmp_path / "store", tmp_path / "run"
    r = invoke("extract", tiny_bert, tiny_dataset, "--out", store, "--max-length", 16, "--device", "cpu",
               "--store-dtype", "fp32", "--split", "train", "--split", "dev")
    assert r.exit_code == 0, r.output
    manifest = json.loads((store / "zarr.json").read_text())["attributes"]["lst"]
    assert sorted(manifest["splits"]) == ["dev", "train"] and manifest["complete"]
    r = invoke("train", store, "--out", run, "--epochs", 2, "--reduction-factor", 4, "--device", "cpu")
    assert r.exit_code == 0, r.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"dev"} and metrics["train_seconds"] > 0
    assert json.loads((run / "config.json").read_text())["reduction_factor"] == 4
    assert (run / "model.safetensors").stat().st_size > 0


def test_missing_dataset_path(tiny_bert, tmp_path):
    r = invoke("extract", tiny_bert, tmp_path / "nope", "--out", tmp_path / "s")
    assert_user_error(r, "nope", "no such path")


def test_unknown_column(tiny_bert, tiny_dataset, tmp_path):
    r = invoke("extract", tiny_bert, tiny_dataset, "--out", tmp_path / "s", "--text-column", "body")
    assert_user_error(r, "body", "columns")


def test_empty_split(tiny_bert, tmp_path):
    data = tmp_path / "data"
    write_tsv(data / "train.tsv", [("hello there", "a"), ("good bye", "b")])
    write_tsv(data / "dev.tsv", [])
    r = invoke("extract", tiny_bert, data, "--out", tmp_path / "s")
    assert_user_error(r, "dev", "empty")


def test_missing_store_and_bad_reduction_factor(tiny_bert, tiny_dataset, tmp_path):
    assert_user_error(invoke("train", tmp_path / "nostore", "--out", tmp_path / "r"), "no such path")
    store = tmp_path / "store"
    assert invoke("extract", tiny_bert, tiny_dataset, "--out", store, "--device", "cpu").exit_code == 0
    assert_user_error(invoke("train", store, "--out", tmp_path / "r", "--reduction-factor", 5), "reduction-factor")


def test_complete_store_needs_overwrite(tiny_bert, tiny_dataset, tmp_path):
    store = tmp_path / "store"
    args = ("extract", tiny_bert, tiny_dataset, "--out", store, "--device", "cpu")
    assert invoke(*args).exit_code == 0
    assert invoke(*args).exit_code == 0  # the same extraction again: verified, nothing to redo
    assert_user_error(invoke(*args, "--max-length", 16), "other options: max_length", "--overwrite")
    assert invoke(*args, "--max-length", 16, "--overwrite").exit_code == 0


def test_refuses_to_clobber_other_files(tiny_bert, tiny_dataset, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    assert_user_error(invoke("extract", tiny_bert, tiny_dataset, "--out", other, "--overwrite"), "something else")
    assert (other / "notes.txt").read_text() == "precious"


def test_unknown_init_is_refused(tiny_bert, tiny_dataset, tmp_path):
    store = tmp_path / "store"
    assert invoke("extract", tiny_bert, tiny_dataset, "--out", store, "--device", "cpu").exit_code == 0
    assert_user_error(invoke("train", store, "--out", tmp_path / "r", "--init", "fisher"), "--init")
