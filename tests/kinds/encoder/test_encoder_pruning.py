"""`--init pruned` for encoder-only backbones: side blocks are Fisher-ranked slices of the backbone blocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import torch_threads
from torch import nn

from featcache.errors import TrainConfigError
from featcache.reader import open_store
from featcache.text.backbone import Backbone, load_backbone
from sidetrain import TrainConfig, fisher, train
from sidetrain.kinds.encoder import prune as P
from sidetrain.kinds.encoder.recipe import build_model
from sidetrain.networks.encoder_stack import LadderSideNetwork, block_list
from sidetrain.networks.side_config import SideConfig

N = 32  # examples scored in these tests (1024 in real runs)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):  # tiny models on a shared 2-core machine: a second thread only spins
        yield


@pytest.fixture(scope="module")
def store(tiny_store) -> Path:
    return tiny_store


@pytest.fixture(scope="module")
def backbone(tiny_bert):
    return load_backbone(str(tiny_bert), "fp32", "cpu")


@pytest.fixture(scope="module")
def scores(store, backbone):
    return P.fisher_scores(open_store(store), "train", backbone, n_examples=N, batch_size=8)


def side(store: Path, r: int, layers=None):
    cfg = TrainConfig(store=str(store), out="", reduction_factor=r, layers=layers)
    return build_model(cfg, open_store(store).manifest)


def top(s: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.argsort(s, descending=True)[:k]).values


def test_r1_copies_the_backbone_blocks(store, backbone, scores):
    model = side(store, 1)
    P.pruned_init(model, backbone, scores)
    for j, block in enumerate(model.blocks):
        src = dict(backbone.model.encoder.layer[j].named_parameters())
        for name, p in block.named_parameters():
            assert torch.equal(p, src[name]), name


def test_r2_slices_by_fisher_rank_per_head(store, backbone, scores):
    model = side(store, 2, layers=[2])  # side block 0 sits beside backbone block 1
    P.pruned_init(model, backbone, scores)
    assert scores["model"].shape == (32,) and scores["1.ff"].shape == (64,) and scores["1.qk"].shape == (32,)
    assert not torch.equal(scores["1.qk"], scores["1.vo"])  # two rankings
    m, ff = top(scores["model"], 16), top(scores["1.ff"], 32)
    # 4 heads of 8 dims: each side head keeps the best 4 dims of its own backbone head
    qk = torch.cat([h * 8 + top(scores["1.qk"].view(4, 8)[h], 4) for h in range(4)])
    vo = torch.cat([h * 8 + top(scores["1.vo"].view(4, 8)[h], 4) for h in range(4)])
    assert torch.equal(qk.view(4, 4) // 8, torch.arange(4)[:, None].expand(4, 4))
    src = backbone.model.encoder.layer[1]
    blk = model.blocks[0]
    att, s_att = src.attention, blk.attention
    for proj in ("query", "key"):  # query and key share their dims
        assert torch.equal(getattr(s_att.self, proj).weight, getattr(att.self, proj).weight[qk][:, m])
        assert torch.equal(getattr(s_att.self, proj).bias, getattr(att.self, proj).bias[qk])
    assert torch.equal(s_att.self.value.weight, att.self.value.weight[vo][:, m])
    assert torch.equal(s_att.output.dense.weight, att.output.dense.weight[m][:, vo])
    assert torch.equal(s_att.output.dense.bias, att.output.dense.bias[m])
    assert torch.equal(s_att.output.LayerNorm.weight, att.output.LayerNorm.weight[m])
    assert torch.equal(blk.intermediate.dense.weight, src.intermediate.dense.weight[ff][:, m])
    assert torch.equal(blk.intermediate.dense.bias, src.intermediate.dense.bias[ff])
    assert torch.equal(blk.output.dense.weight, src.output.dense.weight[m][:, ff])
    assert torch.equal(blk.output.LayerNorm.bias, src.output.LayerNorm.bias[m])


def test_scores_are_cached_per_split_and_count(store, backbone, scores, monkeypatch):
    reader = open_store(store)
    path = P.fisher_path(reader, "train", N)
    assert path.exists() and path.parent == store.parent
    stamp = path.stat().st_mtime_ns
    calls = []

    def compute(*args, **kw):
        calls.append(args[2])
        return {"model": torch.zeros(32)}

    monkeypatch.setattr(P, "_compute", compute)
    monkeypatch.setattr(P, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded for cached scores"))
    again = P.fisher_scores(reader, "train", n_examples=N)  # no backbone given, none loaded
    assert calls == [] and path.stat().st_mtime_ns == stamp
    assert all(torch.equal(again[k], scores[k]) for k in scores) and again.keys() == scores.keys()
    monkeypatch.setattr(P, "load_backbone", lambda *a, **k: backbone)
    P.fisher_scores(reader, "train", n_examples=N - 8)
    P.fisher_scores(reader, "dev", n_examples=N)
    assert calls == [N - 8, 30]  # another count, another split (30 rows): recomputed, in their own files
    assert P.fisher_path(reader, "dev", 30).exists() and path.stat().st_mtime_ns == stamp


def test_cache_of_an_older_format_is_recomputed(store, backbone, monkeypatch):
    from safetensors.torch import save_file

    reader, n = open_store(store), N - 16
    path = P.fisher_path(reader, "train", n)
    meta = fisher.cache_meta("train", n, reader.manifest["backbone"]["revision"])
    old = {k: v for k, v in meta.items() if k != "format"}  # what the code before sidetrain/fisher.py wrote
    save_file({"model": torch.ones(32)}, str(path), metadata=old)
    calls = []
    monkeypatch.setattr(P, "_compute", lambda *a, **k: calls.append(a[2]) or {"model": torch.zeros(32)})
    assert torch.equal(P.fisher_scores(reader, "train", backbone, n_examples=n)["model"], torch.zeros(32))
    assert calls == [n] and fisher.read_cached_scores(path, meta) is not None  # rewritten in the current format


def test_fisher_information_sums_squared_gradients_of_the_scored_weights_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)).requires_grad_(False)
    model[2].weight.requires_grad_(True)  # a flag to restore as it was
    batches = [torch.randn(5, 3), torch.randn(2, 3)]

    def loss(x):
        return model(x).pow(2).mean()

    scored = {"first": model[0].weight, "last": model[2].bias}
    got = fisher.fisher_information(model, batches, loss, scored)
    assert got.keys() == scored.keys() and model.training  # back in training mode
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad and not model[2].bias.requires_grad
    assert all(p.grad is None for p in model.parameters())
    model.eval()  # the reference: eval mode (no dropout), plain autograd
    want = {k: torch.zeros_like(p) for k, p in scored.items()}
    for p in scored.values():
        p.requires_grad_(True)
    for x in batches:
        for k, g in zip(scored, torch.autograd.grad(loss(x), list(scored.values()))):
            want[k] += g ** 2
    assert all(torch.allclose(got[k], want[k]) for k in want)


def test_example_batches_are_the_first_n_sorted_by_length():
    batches = fisher.example_batches(np.array([5, 3, 9, 3, 1, 7]), 5, 2)
    assert [b.tolist() for b in batches] == [[4, 1], [3, 0], [2]]  # example 5 is not among the first 5


def test_train_with_pruned_init(store, tmp_path):
    def run(name: str, init: str) -> np.ndarray:
        train(TrainConfig(store=str(store), out=str(tmp_path / name), epochs=1, batch_size=16, reduction_factor=4,
                          device="cpu", seed=3, max_steps=3, init=init))
        lines = (tmp_path / name / "train_log.jsonl").read_text().splitlines()
        return np.array([json.loads(line)["loss"] for line in lines])

    pruned, rand = run("pruned", "pruned"), run("random", "random")
    assert len(pruned) == 3 and pruned[0] != rand[0]
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["init"] == "pruned"
    n = min(P.N_EXAMPLES, len(open_store(store).split("train")))
    assert P.fisher_path(open_store(store), "train", n).exists()
    np.testing.assert_array_equal(run("again", "pruned"), pruned)  # scores now cached: same run


class Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.mixer = nn.Linear(32, 32)  # a d x d weight no name pattern knows
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)


def test_unsupported_block_layout_names_the_parameter():
    axes = P.block_axes(nn.ModuleDict({"up": nn.Linear(32, 64), "down": nn.Linear(64, 32), "ln": nn.LayerNorm(32)}), 32)
    assert axes["up.weight"] == ("ff", "model") and axes["up.bias"] == ("ff",) and axes["down.bias"] == ("model",)
    with pytest.raises(TrainConfigError, match=r"'block 3: mixer\.weight'.*--init random"):
        P.block_axes(Mixer(), 32, "block 3: ")


# Every supported family's block, whatever its names: 4 query/key, 3 value/output, 2+2 feed-forward
# entries, and 6 on the residual stream (2 layer norms, the out-projection and second feed-forward biases).
LAYOUT = sorted([("qk", "model")] * 2 + [("qk",)] * 2 + [("vo", "model"), ("vo",), ("model", "vo")]
                + [("ff", "model"), ("ff",), ("model", "ff")] + [("model",)] * 6)


BERT_STYLE = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 64,
              "vocab_size": 99}
FAMILIES = {"bert": BERT_STYLE, "roberta": BERT_STYLE, "electra": BERT_STYLE, "mpnet": BERT_STYLE,
            "distilbert": {"dim": 32, "n_heads": 4, "n_layers": 2, "hidden_dim": 64, "vocab_size": 99},
            "deberta-v2": {**BERT_STYLE, "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                           "position_buckets": 8, "max_relative_positions": 16}}
QUERY = {"distilbert": "attention.q_lin.weight", "mpnet": "attention.attn.q.weight",
         "deberta-v2": "attention.self.query_proj.weight"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_block_layouts_of_other_families(family):
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **FAMILIES[family])
    model = AutoModel.from_config(config).eval()
    blocks = block_list(model, 2)
    axes = [P.block_axes(b, 32) for b in blocks]
    extra = [("qk", "model")] * 2 + [("qk",)] * 2 if family == "deberta-v2" else []  # pos_key/pos_query_proj
    assert sorted(axes[0].values()) == sorted(LAYOUT + extra)
    fisher = [{k: torch.rand_like(p) for k, p in b.named_parameters()} for b in blocks]
    scores = P._channel_scores(fisher, axes, 32)
    backbone = Backbone(model, None, family, "r", "fp32", torch.device("cpu"))
    query = QUERY.get(family, "attention.self.query.weight")
    full = dict(blocks[1].named_parameters())
    for r in (1, 2):
        try:
            side = LadderSideNetwork(config, SideConfig(num_outputs=3, stored_layers=[0, 1, 2], kept_layers=[1, 2],
                                                        reduction_factor=r, dropout=0.1, attention_dropout=0.0,
                                                        pooling="mean", num_heads=None, top="side"))
        except (AttributeError, ValueError, TrainConfigError) as err:  # no side network for this family (yet)
            pytest.skip(f"{family}: {err}")
        P.pruned_init(side, backbone, scores)
        params = dict(side.blocks[1].named_parameters())
        if r == 1:
            assert all(torch.equal(p, full[n]) for n, p in params.items())
        else:
            qk = torch.cat([h * 8 + top(scores["1.qk"].view(4, 8)[h], 4) for h in range(4)])
            assert torch.equal(params[query], full[query][qk][:, top(scores["model"], 16)])


@pytest.mark.parametrize("stack", [1, 2])
def test_sweep_trials_with_pruned_init(store, tmp_path, monkeypatch, stack):
    pytest.importorskip("optuna")
    from sidetrain.search.sweep import SweepConfig, run_sweep

    calls, real = [], P.init_from_backbone
    monkeypatch.setattr(P, "init_from_backbone", lambda side, *a, **k: calls.append(a) or real(side, *a, **k))
    space = {"init": "pruned", "epochs": 1, "batch_size": 32, "reduction_factor": 4, "layers": "all", "lr": [1e-3, 3e-3]}
    out = tmp_path / "sw"
    summary = run_sweep(SweepConfig(store=str(store), out=str(out), trials=2, stack=stack, space=space, prune=False,
                                    device="cpu", threads=1))
    assert summary["finished"] == 2 and len(calls) == 2  # plain trials and stacked ones alike
    for run in (out / "trials").iterdir():
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["init"] == "pruned" and cfg.get("stacked_with", 1) == stack


def test_sweep_space_refuses_an_unknown_init(store):
    from sidetrain.search.space import SpaceError, resolve_space

    with pytest.raises(SpaceError, match="init values among random, pruned.*fisher"):
        resolve_space(open_store(store).manifest, {"init": ["random", "fisher"]})
