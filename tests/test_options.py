"""Each option exists once, as a config field: every field of ExtractConfig / TrainConfig / SweepConfig is a
parameter of its command (or marked library-only), with the field's default and help text."""

from __future__ import annotations

import dataclasses
import json
import re
from enum import Enum

import pytest
import typer.main
from conftest import assert_user_error, invoke

import cli
from featcache.config import ExtractConfig, opt
from featcache.errors import LstError
from sidetrain.config import TrainConfig
from sidetrain.search.config import SweepConfig

CASES = {  # command -> (its config, CLI names of the fields the command line renames)
    "extract": (ExtractConfig, {"splits": "split"}),
    "train": (TrainConfig, {}),
    "sweep": (SweepConfig, {"store": "target"}),
}
OPTIONAL_ON_CLI = {("sweep", "out")}  # required by the config, but `lst sweep DIR --report` needs none


def cli_params(command: str) -> dict:
    return {p.name: p for p in typer.main.get_command(cli.app).commands[command].params}


def unreachable(cls: type, params: dict, renamed: dict[str, str]) -> list[str]:
    """Fields with neither a parameter of the command nor a library-only mark."""
    return [f.name for f in dataclasses.fields(cls)
            if not f.metadata.get("library_only") and renamed.get(f.name, f.name) not in params]


def words(text: str) -> str:
    """Help text as words: no colour codes, no box drawing, whitespace collapsed (rich wraps and boxes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("command", CASES)
def test_every_field_is_a_parameter_or_library_only(command):
    cls, renamed = CASES[command]
    params = cli_params(command)
    missing = unreachable(cls, params, renamed)
    assert not missing, (f"{cls.__name__} fields {missing} have no flag on `lst {command}`: give them one in "
                         "cli.py, or mark them opt(..., library_only='why')")
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name}: give it its help text, opt(default, 'help')"
        if f.metadata.get("library_only"):
            assert renamed.get(f.name, f.name) not in params, f"{f.name} is marked library-only but has a flag"


def test_the_check_catches_a_field_without_a_flag():
    @dataclasses.dataclass
    class Grown(TrainConfig):
        new_knob: int = opt(1, "Something new.")
        quiet_knob: int = opt(1, "Something internal.", library_only="tests only")

    assert unreachable(Grown, cli_params("train"), {}) == ["new_knob"]


@pytest.mark.parametrize("command", CASES)
def test_cli_defaults_are_the_field_defaults(command):
    cls, renamed = CASES[command]
    params = cli_params(command)
    for f in dataclasses.fields(cls):
        p = params.get(renamed.get(f.name, f.name))
        if p is None:
            continue  # library-only
        if f.default is dataclasses.MISSING:
            assert p.required or (command, f.name) in OPTIONAL_ON_CLI, f.name
        else:
            default = p.default.value if isinstance(p.default, Enum) else p.default
            assert default == f.default, f"`lst {command}` {p.opts[0]}: default {default!r}, field {f.default!r}"


@pytest.mark.parametrize("command", CASES)
def test_help_shows_the_field_help(command, monkeypatch):
    cls, renamed = CASES[command]
    params = cli_params(command)
    monkeypatch.setenv("COLUMNS", "2000")  # rich reads it for each help screen: no wrapping
    r = invoke(command, "--help")
    assert r.exit_code == 0, r.output
    shown = words(r.output)
    for f in dataclasses.fields(cls):
        p = params.get(renamed.get(f.name, f.name))
        if p is not None:
            assert words(f.metadata["help"]) in words(p.help), f.name
            assert words(f.metadata["help"]) in shown, f"`lst {command} --help` lacks the help of {f.name}"


def test_enum_choices_follow_the_library():
    from featcache.loading import PRECISIONS
    from featcache.store import STORE_DTYPES

    assert [e.value for e in cli.StoreDtype] == list(STORE_DTYPES)
    assert {e.value for e in cli.Precision} == set(PRECISIONS)


def test_parse_layers():
    assert cli.parse_layers(None) is None and cli.parse_layers(" All ") is None
    assert cli.parse_layers("0,3,6") == [0, 3, 6]
    assert cli.parse_layers(" 1-3 , 5") == [1, 2, 3, 5]
    for bad in ("1,,3", "1,3,", ",1", "", "1-", "3-1", "a", "1-2-3"):
        with pytest.raises(LstError, match=r"^Expected --layers like .* Got '"):
            cli.parse_layers(bad)


@pytest.mark.parametrize("spec", ["1,,3", "1,"])
def test_empty_layer_item_is_one_error_line(spec, tmp_path):
    r = invoke("train", tmp_path / "store", "--out", tmp_path / "run", "--layers", spec)
    assert_user_error(r, "--layers", f"'{spec}'")
    assert r.output.count("Error:") == 1 and len(r.output.strip().splitlines()) == 1, r.output


class Captured(LstError):
    pass


def capture(monkeypatch, target: str) -> list:
    """Replace the library call at `target` by one that records its config and stops the command."""
    seen = []

    def fake(cfg):
        seen.append(cfg)
        raise Captured("captured")

    monkeypatch.setattr(target, fake)
    return seen


def test_new_train_flags_reach_the_config(monkeypatch):
    seen = capture(monkeypatch, "sidetrain.train")
    r = invoke("train", "STORE", "-o", "RUN", "--grad-clip", 0.5, "--prefetch", "--no-preload", "--layers", "1-2",
               "--max-steps", 3, "--online", "--no-resume")
    assert_user_error(r, "captured")
    assert seen == [TrainConfig(store="STORE", out="RUN", grad_clip=0.5, prefetch=True, preload=False, layers=[1, 2],
                                max_steps=3, online=True, resume=False)]


def test_extract_flags_reach_the_config(monkeypatch):
    seen = capture(monkeypatch, "featcache.extract")
    r = invoke("extract", "MODEL", "DATA", "-o", "STORE", "--split", "train", "--split", "dev", "--chunk-tokens", 32,
               "--store-dtype", "int8", "--quoting", "none", "--no-header", "--layers", "0,2")
    assert_user_error(r, "captured")
    assert seen == [ExtractConfig(model="MODEL", dataset="DATA", out="STORE", splits=["train", "dev"], chunk_tokens=32,
                                  store_dtype="int8", quoting="none", header=False, layers=[0, 2])]


def test_sweep_flags_reach_the_config(monkeypatch, tmp_path):
    seen = capture(monkeypatch, "sidetrain.search.sweep.run_sweep")
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"lr": [1e-3, 3e-3]}))
    r = invoke("sweep", "STORE", "-o", tmp_path / "sw", "--space", space, "--stale-after-s", 30, "--max-retries", 0,
               "--no-prune")
    assert_user_error(r, "captured")
    assert seen == [SweepConfig(store="STORE", out=str(tmp_path / "sw"), space={"lr": [1e-3, 3e-3]}, stale_after_s=30.0,
                                max_retries=0, prune=False)]


@pytest.mark.parametrize("args, fragment", [
    (("train", "S", "-o", "R", "--grad-clip", -1), "--grad-clip"),
    (("train", "S", "-o", "R", "--max-steps", -1), "--max-steps"),
    (("sweep", "S", "-o", "D", "--stale-after-s", 5), "--stale-after-s"),
    (("sweep", "S", "-o", "D", "--max-retries", -1), "--max-retries"),
    (("extract", "M", "D", "-o", "S", "--chunk-tokens", 0), "--chunk-tokens"),
])
def test_new_flags_refuse_bad_values(args, fragment):
    assert_user_error(invoke(*args), fragment)


def test_grad_clip_is_saved_with_the_run(tiny_store, tmp_path, one_thread):
    run = tmp_path / "run"
    r = invoke("train", tiny_store, "--out", run, "--grad-clip", 0.5, "--max-steps", 1, "--epochs", 1,
               "--device", "cpu", "--reduction-factor", 4)
    assert r.exit_code == 0, r.output
    assert json.loads((run / "config.json").read_text())["grad_clip"] == 0.5
