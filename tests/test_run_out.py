"""`lst train --out` and `lst sweep --out` never overwrite or delete what lst did not write: a folder of the
user's own files, a config.json that is not an lst run's, or a plain file is refused in one line, before
anything is written; an lst run or sweep folder is trained into again or resumed as before."""

from __future__ import annotations

import json

import pytest
from conftest import assert_user_error, invoke

from sidetrain.run_files import prepare_run_dir

TRAIN = ("--epochs", 1, "--batch-size", 32, "--device", "cpu")
HINT = "lst never deletes what it did not write"


def _train(store, out, *extra):
    return invoke("train", store, "--out", out, *TRAIN, *extra)


def test_train_refuses_a_folder_with_the_users_config(tiny_store, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    mine = '{"learning_rate": 3e-4, "note": "my own experiment"}\n'
    (out / "config.json").write_text(mine)
    r = _train(tiny_store, out)
    assert_user_error(r, "Expected an empty folder or an lst run folder at --out", "config.json", HINT)
    assert (out / "config.json").read_text() == mine  # untouched
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # nothing written beside it


def test_train_refuses_unknown_files_and_names_them(tiny_store, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (out / name).write_text(name)
    r = _train(tiny_store, out)
    assert_user_error(r, "a.txt, b.txt, c.txt, ...", HINT)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt"]
    assert all((out / n).read_text() == n for n in ("a.txt", "d.txt"))


def test_train_refuses_a_file(tiny_store, tmp_path):
    out = tmp_path / "run.json"
    out.write_text("keep me")
    r = _train(tiny_store, out)
    assert_user_error(r, "a file", HINT)
    assert out.read_text() == "keep me"


def test_train_into_its_own_run_again(tiny_store, tmp_path):
    out = tmp_path / "run"
    assert _train(tiny_store, out).exit_code == 0
    assert json.loads((out / "config.json").read_text())["out"] == str(out)
    r = _train(tiny_store, out)  # resumes (the checkpoint is there): fine
    assert r.exit_code == 0, r.output
    r = _train(tiny_store, out, "--no-resume")  # trains again into its own folder: fine
    assert r.exit_code == 0, r.output
    (out / "notes.txt").write_text("mine")  # a file of the user's inside a run: refused from now on
    assert_user_error(_train(tiny_store, out), "notes.txt", HINT)
    assert (out / "notes.txt").read_text() == "mine"


def test_sweep_refuses_foreign_folders_and_files(tiny_store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: 1.0e-3\nbatch_size: 32\nepochs: 1\n")
    args = ("--trials", 1, "--space", space, "--device", "cpu", "--threads", 1)
    out = tmp_path / "sw"
    out.mkdir()
    (out / "results.csv").write_text("keep")
    r = invoke("sweep", tiny_store, "--out", out, *args)
    assert_user_error(r, "Expected an empty folder or an lst sweep folder at --out", "results.csv", HINT)
    assert sorted(p.name for p in out.iterdir()) == ["results.csv"] and (out / "results.csv").read_text() == "keep"
    bad_json = tmp_path / "sw2"
    bad_json.mkdir()
    (bad_json / "sweep.json").write_text("not lst's")
    assert_user_error(invoke("sweep", tiny_store, "--out", bad_json, *args), "sweep.json", HINT)
    assert (bad_json / "sweep.json").read_text() == "not lst's"
    plain = tmp_path / "sweep.txt"
    plain.write_text("keep")
    assert_user_error(invoke("sweep", tiny_store, "--out", plain, *args), "a file", HINT)
    assert plain.read_text() == "keep"


@pytest.mark.parametrize("kind", ["run", "sweep"])
def test_prepare_run_dir_accepts_nothing_empty_and_its_own(tmp_path, kind):
    assert prepare_run_dir(tmp_path / "new", kind).is_dir()
    assert prepare_run_dir(tmp_path / "new", kind).is_dir()  # empty: fine
    marker, keys = ("sweep.json", {"store": "s", "out": "o", "trials": 1, "study_name": "x"}) if kind == "sweep" \
        else ("config.json", {"store": "s", "out": "o", "store_manifest": {}})
    (tmp_path / "new" / marker).write_text(json.dumps(keys))
    assert prepare_run_dir(tmp_path / "new", kind).is_dir()
