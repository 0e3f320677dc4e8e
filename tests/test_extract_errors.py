"""Bad input to `lst extract`: one clear line, exit code 1, and nothing lost; the pre-flight dry run."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import zarr
from conftest import assert_user_error, invoke, synthetic_rows, write_tsv

from featcache import ExtractConfig, extract, open_store
from featcache import writer as W
from featcache.errors import DatasetError

pytestmark = pytest.mark.usefixtures("one_thread")



def test_nonexistent_model_path(tiny_dataset, tmp_path):
    r = invoke("extract", tmp_path / "no_model", tiny_dataset, "--out", tmp_path / "s")
    assert_user_error(r, "no_model", "no such path")
    assert not (tmp_path / "s").exists()


def test_non_utf8_file(tiny_bert, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_bytes("text\tlabel\ncaf\xe9 au lait\tx\n".encode("latin-1"))
    assert_user_error(invoke("extract", tiny_bert, data, "--out", tmp_path / "s"), "UTF-8", "train.tsv")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("unlabelled", ["dev", "train"])  # dev is read first: the label name comes from train
def test_labels_missing_in_one_split(tiny_bert, tmp_path, unlabelled):
    data = tmp_path / "data"
    for split in ("train", "dev"):
        rows = synthetic_rows(6, 1)
        if split == unlabelled:
            write_tsv(data / f"{split}.tsv", [(t,) for t, _ in rows], header=("text",))
        else:
            write_tsv(data / f"{split}.tsv", rows)
    r = invoke("extract", tiny_bert, data, "--out", tmp_path / "s")
    assert_user_error(r, "label", unlabelled, f"--split {unlabelled}")
    assert not (tmp_path / "s").exists()


def test_store_path_that_is_a_file(tiny_bert, tiny_dataset, tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("precious")
    assert_user_error(invoke("extract", tiny_bert, tiny_dataset, "--out", target, "--overwrite"), "something else")
    assert target.read_text() == "precious"


def test_complete_url_store_needs_overwrite(tiny_bert, tiny_dataset):
    url = "memory://lst-errors/store.zarr"
    args = ("extract", tiny_bert, tiny_dataset, "--out", url, "--device", "cpu", "--split", "dev", "--max-length", 12)
    assert invoke(*args).exit_code == 0
    assert_user_error(invoke(*args[:-1], 16), "complete store", "other options: max_length", "--overwrite")
    assert open_store(url).manifest["complete"]  # untouched
    assert invoke(*args).exit_code == 0  # the same command again: verified, nothing to redo


def settings(model, data, out) -> ExtractConfig:
    return ExtractConfig(model=str(model), dataset=str(data), out=str(out), max_length=16, batch_size=8, device="cpu",
                         store_dtype="fp32", shard_tokens=64, chunk_tokens=64, error_sample=0)


def test_disk_full_is_a_clear_error_and_resume_completes(tiny_bert, tiny_dataset, tmp_path, monkeypatch):
    real, calls = W._write_shard, []

    def fill_disk(*args):
        calls.append(args[1])
        if len(calls) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args)

    monkeypatch.setattr(W, "_write_shard", fill_disk)
    store = tmp_path / "s"
    args = ("extract", tiny_bert, tiny_dataset, "--out", store, "--device", "cpu", "--store-dtype", "fp32",
            "--max-length", 16, "--batch-size", 8, "--shard-tokens", 64, "--error-sample", 0)
    r = invoke(*args)
    assert_user_error(r, "disk is full", "re-run the same command")
    done = sum(int(zarr.open_group(str(store), mode="r")[s]["shard_done"][:].sum()) for s in ("train", "dev", "test"))
    assert done == 2  # the shards written before the disk filled are kept
    monkeypatch.setattr(W, "_write_shard", real)
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    extract(settings(tiny_bert, tiny_dataset, tmp_path / "ref"))  # the CLI's settings, uninterrupted
    for split in ("train", "dev", "test"):
        a = zarr.open_group(str(store), mode="r")[split]["hidden"][:]
        b = zarr.open_group(str(tmp_path / "ref"), mode="r")[split]["hidden"][:]
        np.testing.assert_array_equal(a, b)


def test_dry_run_prints_the_summary_and_loads_nothing(tiny_bert, tiny_dataset, tmp_path, monkeypatch):
    def no_weights(*_a, **_k):
        raise AssertionError("the backbone was loaded by a dry run")

    from featcache.kinds.encoder import kind as encoder_kind

    monkeypatch.setattr(encoder_kind, "load_backbone", no_weights)
    r = invoke("extract", tiny_bert, tiny_dataset, "--out", tmp_path / "s", "--dry-run", "--max-length", 8,
               "--store-dtype", "int8", "--layers", "0,2")
    assert r.exit_code == 0, r.output
    for fragment in ("train", "120", "truncated", "bytes/token 72", "shards"):  # 2 layers x (32 + 4 bytes)
        assert fragment in r.output, r.output
    assert not (tmp_path / "s").exists()
    summary = extract(ExtractConfig(model=str(tiny_bert), dataset=str(tiny_dataset), out=str(tmp_path / "s"),
                                    max_length=8, dry_run=True))["preflight"]
    assert summary["splits"]["train"]["examples"] == 120 and summary["splits"]["train"]["truncated"] > 0
    assert summary["tokens"] == sum(s["tokens"] for s in summary["splits"].values())


def test_unknown_store_dtype_names_the_flag():
    with pytest.raises(Exception, match="--store-dtype"):
        ExtractConfig(model="m", dataset="d", out="o", store_dtype="int4")
    with pytest.raises(DatasetError, match="--max-length"):
        ExtractConfig(model="m", dataset="d", out="o", max_length=1)


def test_manifest_is_json(tiny_bert, tiny_dataset, tmp_path):
    extract(settings(tiny_bert, tiny_dataset, tmp_path / "s"))
    manifest = json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"]["lst"]
    assert manifest["complete"] and manifest["layout_complete"] and manifest["shard_tokens"] == 64


def test_url_that_holds_something_else(tiny_bert, tiny_dataset):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/lst-errors/notes/readme.txt", b"precious")
    r = invoke("extract", tiny_bert, tiny_dataset, "--out", "memory://lst-errors/notes", "--overwrite",
               "--device", "cpu")
    assert_user_error(r, "something else")
    assert fs.cat("/lst-errors/notes/readme.txt") == b"precious"


def test_extract_checks_what_is_at_a_url_out(tiny_bert, tiny_dataset, tmp_path):
    """file:// is the local path it names: a user's folder is refused and kept; a store there is replaced
    only with --overwrite (the same guard as `lst import`, featcache/destination.py)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    args = (tiny_bert, tiny_dataset, "--device", "cpu", "--max-length", 8, "--error-sample", 0)
    assert_user_error(invoke("extract", *args, "--out", f"file://{mine}"), "holds something else")
    assert (mine / "notes.txt").read_text() == "keep me"
    url = f"file://{tmp_path / 'store'}"
    assert invoke("extract", *args, "--out", url).exit_code == 0
    assert open_store(tmp_path / "store").manifest["complete"]
    assert_user_error(invoke("extract", *args, "--out", url, "--max-length", 12), "already exists", "--overwrite")
    r = invoke("extract", *args, "--out", url, "--max-length", 12, "--overwrite")
    assert r.exit_code == 0, r.output
    assert open_store(url).split("train").reader_kind == "shards"  # read as the local path: memory-mapped


def test_empty_files_ragged_line_numbers_and_a_store_killed_before_its_manifest(tiny_bert, tmp_path, caplog):
    data = tmp_path / "data"
    write_tsv(data / "train.tsv", [("a b", "x"), ("c d", "y"), ("e\tf", "x"), ("g h", "y"), ("i\tj", "y")])
    extract(ExtractConfig(model=str(tiny_bert), dataset=str(data), out=str(tmp_path / "r"), max_length=8,
                          device="cpu", error_sample=0))
    facts = open_store(tmp_path / "r").manifest["splits"]["train"]
    assert facts["rejected_rows"] == 2 and facts["rejected_lines"] == [4, 6]  # the header is line 1
    assert "at lines 4, 6" in caplog.text
    (data / "train.tsv").write_text("")
    assert_user_error(invoke("extract", tiny_bert, data, "--out", tmp_path / "s"), "an empty file", "train.tsv")
    (data / "train.jsonl").write_text("")
    (data / "train.tsv").unlink()
    assert_user_error(invoke("extract", tiny_bert, data, "--out", tmp_path / "s"), "an empty file", "train.jsonl")
    zarr.open_group(str(tmp_path / "killed"), mode="a")  # what a kill during the error sample leaves
    assert_user_error(invoke("train", tmp_path / "killed", "--out", tmp_path / "run"), "stopped before writing the "
                      "manifest", "Re-run the same `lst extract`")
    assert_user_error(invoke("inspect", tmp_path / "killed"), "stopped before writing the manifest")
