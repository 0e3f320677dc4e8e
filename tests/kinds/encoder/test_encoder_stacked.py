"""Stacked training (sidetrain/search/stacked.py, kinds/encoder/stacked_model.py): K members in one fused
pass train as K separate `lst train` runs with their own settings; dropout masks differ per member; a
pruned member stops and is compacted out; a killed stacked sweep loses no trial."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from featcache.errors import TrainConfigError
from sidetrain import TrainConfig, train
from sidetrain.search.stacked import train_stacked

KW = {"device": "cpu", "batch_size": 32, "reduction_factor": 4, "dropout": 0.0, "epochs": 2}


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def files(run: Path, name: str):
    return json.loads((run / name).read_text())


def separate(cfg: TrainConfig, out: Path) -> dict:
    """The `lst train` run of a member's settings (its config.json: the stack's batch order, data_seed)."""
    recorded = files(Path(cfg.out), "config.json")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return train(TrainConfig(**{**{k: v for k, v in recorded.items() if k in fields}, "out": str(out)}))


def test_members_equal_separate_runs_with_their_settings(tiny_store, tmp_path, one_thread):
    """Dropout off: seed, lr, weight decay, warm-up, clipping, epochs and --max-steps per member; each
    member's per-step losses, best score and predictions equal its own `lst train` run."""
    settings = [{"seed": 0, "lr": 3e-3}, {"seed": 1, "lr": 3e-3}, {"seed": 0, "lr": 1e-2, "weight_decay": 0.3},
                {"seed": 2, "lr": 5e-3, "warmup_steps": 3, "grad_clip": 0.05}, {"seed": 0, "lr": 5e-3, "grad_clip": 0.0,
                "warmup_steps": 0}, {"seed": 3, "lr": 2e-3, "epochs": 3}, {"seed": 0, "lr": 4e-3, "max_steps": 5}]
    cfgs = [TrainConfig(store=str(tiny_store), out=str(tmp_path / f"stk{i}"), **{**KW, **s})
            for i, s in enumerate(settings)]
    stacked = train_stacked(cfgs, engine="fused")
    runs = []
    for i, (c, got) in enumerate(zip(cfgs, stacked)):
        want = separate(c, tmp_path / f"sep{i}")
        runs.append(want)
        stk, sep = Path(c.out), tmp_path / f"sep{i}"
        assert losses(stk) == pytest.approx(losses(sep), rel=1e-4), settings[i]
        assert len(losses(stk)) == want["steps"] == got["steps"]
        assert got["best_eval"] == want["best_eval"] and got["stacked_with"] == len(cfgs)
        assert files(stk, "predictions.json") == files(sep, "predictions.json"), settings[i]
        assert [h["epoch"] for h in got["history"]] == [h["epoch"] for h in want["history"]]
        config = files(stk, "config.json")
        assert config["data_seed"] == 0 and "batch order" in config["stacked_batches"]
        assert set(files(stk, "metrics.json")) == set(files(sep, "metrics.json"))
        measured = files(stk, "metrics.json")  # the stack's peak, measured (it was "not measured"); RSS may not grow when freed memory is reused
        assert measured["peak_memory_bytes"] >= 0 and "whole stack" in measured["peak_memory_kind"]
        memory, alone = measured["memory"], files(sep, "metrics.json")["memory"]  # the whole stack's, split as alone
        assert list(memory) == list(alone) and memory["data_policy"] == alone["data_policy"]
        assert memory["gradient_bytes"] == len(cfgs) * alone["gradient_bytes"]  # K rows of the member's parameters
        assert memory["optimizer_bytes"] == 2 * memory["gradient_bytes"] and memory["model_bytes"] > len(cfgs) * alone["model_bytes"]
        assert {p.name for p in stk.iterdir()} >= {"config.json", "metrics.json", "model.safetensors",
                                                    "predictions.json", "train_log.jsonl"}
    # the settings mattered: no two members trained alike
    finals = [round(losses(Path(c.out))[-1], 6) for c in cfgs]
    assert len(set(finals)) == len(finals)
    assert runs[0]["steps"] != runs[5]["steps"] != runs[6]["steps"]


def test_dropout_masks_differ_per_member(tiny_store, tmp_path, one_thread):
    """Same seed, same weights at the start: with dropout on, members draw their own masks; a member
    with every dropout off still equals its separate run; per-member attention dropout too."""
    base = dict(store=str(tiny_store), **{**KW, "epochs": 1})
    cfgs = [TrainConfig(out=str(tmp_path / "a"), **{**base, "dropout": 0.3}),
            TrainConfig(out=str(tmp_path / "b"), **{**base, "dropout": 0.3}),
            TrainConfig(out=str(tmp_path / "c"), **base),
            TrainConfig(out=str(tmp_path / "d"), **{**base, "attention_dropout": 0.3})]
    train_stacked(cfgs)
    a, b, c, d = (losses(Path(x.out)) for x in cfgs)
    assert a[0] != b[0] and a != b  # different masks from the first step
    separate(cfgs[2], tmp_path / "sep")
    assert c == pytest.approx(losses(tmp_path / "sep"), rel=1e-4)
    assert d != c


def test_pruned_member_stops_and_the_stack_goes_on(tiny_store, tmp_path, one_thread):
    cfgs = [TrainConfig(store=str(tiny_store), out=str(tmp_path / f"m{i}"), **{**KW, "epochs": 3, "lr": lr})
            for i, lr in enumerate((3e-3, 1e-2, 5e-3))]
    seen: list[tuple[int, int]] = []

    def hook(k):
        def on_epoch(epoch, record):
            seen.append((k, epoch))
            if k == 1 and epoch == 1:
                raise RuntimeError("pruned")
        return on_epoch

    out = train_stacked(cfgs, on_epoch=[hook(k) for k in range(3)])
    assert isinstance(out[1]["stopped"], RuntimeError) and len(out[1]["history"]) == 1
    assert [e for k, e in seen if k == 1] == [1] and [e for k, e in seen if k == 0] == [1, 2, 3]
    assert {p.name for p in (tmp_path / "m1").iterdir()} == {"config.json"}  # as a pruned `lst train` run
    for k in (0, 2):  # the others, trained on after the compaction, still equal their separate runs
        want = separate(cfgs[k], tmp_path / f"sep{k}")
        assert losses(Path(cfgs[k].out)) == pytest.approx(losses(tmp_path / f"sep{k}"), rel=1e-4)
        assert out[k]["best_eval"] == want["best_eval"] and out[k]["stacked_with"] == 3


def test_vmap_fallback_matches_the_fused_network(tiny_store, tmp_path, one_thread):
    base = dict(store=str(tiny_store), **{**KW, "epochs": 1})
    cfgs = [TrainConfig(out=str(tmp_path / f"{e}{i}"), seed=i, lr=lr, **base)
            for e in ("f", "v") for i, lr in enumerate((3e-3, 1e-2))]
    train_stacked(cfgs[:2], engine="fused")
    train_stacked(cfgs[2:], engine="vmap")
    for f, v in zip(cfgs[:2], cfgs[2:]):
        assert losses(Path(f.out)) == pytest.approx(losses(Path(v.out)), rel=1e-4)
    with pytest.raises(TrainConfigError, match="dropout"):  # vmap: one dropout rate for all members
        train_stacked([dataclasses.replace(cfgs[0], out=str(tmp_path / "x"), dropout=0.1),
                       dataclasses.replace(cfgs[1], out=str(tmp_path / "y"))], engine="vmap")


def test_gated_top_members_stack_through_vmap_as_their_own_runs(tiny_store, tmp_path, one_thread):
    """--top last adds parameters the fused stack does not compute: such members train under vmap (auto), and
    each still trains as its own `lst train` run."""
    base = dict(store=str(tiny_store), **{**KW, "epochs": 1, "top": "last"})
    cfgs = [TrainConfig(out=str(tmp_path / f"s{i}"), seed=i, lr=lr, **base) for i, lr in enumerate((3e-3, 1e-2))]
    train_stacked(cfgs)
    for i, c in enumerate(cfgs):
        separate(c, tmp_path / f"a{i}")  # its own run, on the stack's batch order
        assert losses(Path(c.out)) == pytest.approx(losses(tmp_path / f"a{i}"), rel=1e-4)


def test_members_of_different_shapes_are_refused(tiny_store, tmp_path):
    cfgs = [TrainConfig(store=str(tiny_store), out=str(tmp_path / "a"), **KW),
            TrainConfig(store=str(tiny_store), out=str(tmp_path / "b"), **{**KW, "reduction_factor": 8,
                                                                           "batch_size": 16})]
    with pytest.raises(TrainConfigError, match="batch_size, reduction_factor"):
        train_stacked(cfgs)


def test_sweep_samples_freely_then_stacks_trials_of_one_shape(tiny_store, tmp_path):
    """--stack K: trials are sampled freely (K at a time), then grouped by network shape and batch size
    into stacks of up to K; every trial still writes a full run folder."""
    pytest.importorskip("optuna")
    from sidetrain.search.sweep import SweepConfig, run_sweep

    out = tmp_path / "sw"
    space = {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "reduction_factor": [4, 8], "layers": "all", "batch_size": [16, 32], "epochs": {"low": 1, "high": 2}, "dropout": [0.0, 0.1]}
    summary = run_sweep(SweepConfig(store=str(tiny_store), out=str(out), trials=6, stack=3, prune=False, seed=3,
                                    space=space, device="cpu", threads=1))
    assert summary["finished"] == 6
    trials = sorted(_trials(out), key=lambda t: t.number)
    expected: dict[int, int] = {}
    for pool in (trials[:3], trials[3:]):  # pools of K = 3 trials, each grouped by shape
        shapes: dict[tuple, list[int]] = {}
        for t in pool:
            shapes.setdefault((t.params["reduction_factor"], t.params["batch_size"]), []).append(t.number)
        expected.update({n: len(numbers) for numbers in shapes.values() for n in numbers})
    got = {}
    for t in trials:
        run = out / "trials" / str(t.number)
        metrics, config = (json.loads((run / f).read_text()) for f in ("metrics.json", "config.json"))
        assert {"config.json", "metrics.json", "model.safetensors", "predictions.json"} <= {p.name for p in run.iterdir()}
        assert config["epochs"] == t.params["epochs"] and config["dropout"] == t.params["dropout"]
        got[t.number] = metrics["stacked_with"]
    assert got == expected and max(got.values()) > 1, (got, [t.params for t in trials])


def _trials(out: Path):
    import optuna

    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}").get_trials()


def test_killed_stacked_sweep_loses_no_trial(tiny_store, tmp_path):
    """kill -9 mid-stack: every claimed trial of the dead process is failed and queued again; the same
    command then finishes the budget with each killed trial's settings."""
    optuna = pytest.importorskip("optuna")
    from sidetrain.search.sweep import SweepConfig, run_sweep

    out, n = tmp_path / "sw", 4
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 1.0e-3, high: 1.0e-2, log: true}\nreduction_factor: 4\nlayers: all\n"
                     "batch_size: 32\nepochs: 12\n")
    cmd = [sys.executable, "-m", "cli", "sweep", str(tiny_store), "--out", str(out), "--trials", str(n), "--space",
           str(space), "--no-prune", "--stack", "2", "--device", "cpu", "--threads", "1"]
    storage = f"sqlite:///{out / 'study.db'}"

    def trials(*states):
        study = optuna.load_study(study_name=out.name, storage=storage)
        return [t for t in study.get_trials() if not states or t.state.name in states]

    log = (tmp_path / "sweep.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=Path(__file__).resolve().parents[3])
    killed, deadline = [], time.time() + 300
    try:
        while not killed and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if (out / "study.db").exists():
                with contextlib.suppress(Exception):
                    running = trials("RUNNING")
                    if any(t.intermediate_values for t in running):
                        killed = running
        assert killed, f"never mid-stack (exit {proc.poll()}): {(tmp_path / 'sweep.log').read_text()[-800:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    left = trials("RUNNING")
    assert len(left) >= 2  # a whole stack (and the rest of its pool) was claimed by the dead process
    run_sweep(SweepConfig(store=str(tiny_store), out=str(out), trials=n, prune=False, stack=2, device="cpu",
                          threads=1, space={"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "reduction_factor": 4,
                                            "layers": "all", "batch_size": 32, "epochs": 12}))
    complete = trials("COMPLETE")
    assert len(complete) == n and not trials("RUNNING", "WAITING")
    failed = trials("FAIL")
    assert sorted(t.number for t in failed) == sorted(t.number for t in left)
    for t in failed:  # each killed trial ran again with its own settings
        retry = [c for c in complete if c.user_attrs.get("retry_of") == t.number]
        assert len(retry) == 1 and retry[0].params == t.params
    assert any(json.loads((out / "trials" / str(t.number) / "metrics.json").read_text())["stacked_with"] == 2
               for t in complete)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_fused_forward_equals_the_members_and_other_families_fall_back(family, one_thread):
    """The fused network computes each member's LadderSideNetwork forward and gradients (padding masked,
    exact GELU, the config's LayerNorm eps); families it does not reproduce are left to vmap (None)."""
    import torch
    from transformers import AutoConfig

    from sidetrain.kinds.encoder.stacked_model import FusedStack
    from sidetrain.networks.encoder_stack import LadderSideNetwork
    from sidetrain.networks.side_config import SideConfig

    config = AutoConfig.for_model(family, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=128, dim=64, n_layers=3, n_heads=4, hidden_dim=128,
                                  layer_norm_eps=1e-7)
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(LadderSideNetwork(config, SideConfig(
            num_outputs=5, stored_layers=[0, 1, 2, 3], kept_layers=[1, 3], reduction_factor=4, dropout=0.0,
            attention_dropout=0.0, pooling="mean", num_heads=None, top="side")))
    net = FusedStack.fuse(members)
    if family == "distilbert":
        assert net is None
        return
    hidden, mask = torch.randn(6, 9, 4, 64), torch.ones(6, 9, dtype=torch.bool)
    mask[:3, 5:] = False
    flat = torch.stack([net.row(m) for m in members]).requires_grad_()
    got = net.forward(flat, hidden, mask, training=True, dropout=torch.zeros(3))
    want = torch.stack([m(hidden, mask) for m in members])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    got.square().sum().backward()
    want.square().sum().backward()
    grads = torch.stack([torch.cat([dict(m.named_parameters())[n].grad.reshape(-1) for g in net.groups
                                    for n in g.names]) for m in members])  # in the rows' order
    assert torch.allclose(flat.grad, grads, atol=1e-6, rtol=1e-4)
    state = net.state(flat[1])
    assert all(torch.equal(state[n], p.detach()) for n, p in members[1].named_parameters() if p.requires_grad)
