"""`--pooling pair` (sidetrain/networks/top.py: pair_features): a sentence pair's two texts pooled apart (by
their token types), with their difference and product, for the side head and the --top backbone term; refused
where a store holds no marked pairs; stacked trials equal their own runs."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import WORDS, torch_threads, write_tsv
from transformers import BertConfig

from featcache import ExtractConfig, extract
from featcache.errors import TrainConfigError
from sidetrain import TrainConfig, train
from sidetrain.networks.encoder_stack import LadderSideNetwork
from sidetrain.networks.side_config import SideConfig
from sidetrain.networks.top import pair_features

CONFIG = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=50)


def network(pooling: str, top: str = "side") -> LadderSideNetwork:
    torch.manual_seed(0)
    side = SideConfig(num_outputs=2, stored_layers=[0, 1, 2], kept_layers=[1, 2], reduction_factor=4, dropout=0.0,
                      attention_dropout=0.0, pooling=pooling, num_heads=None, top=top)
    return LadderSideNetwork(CONFIG, side).eval()


def test_pair_features_pool_each_text_over_its_own_real_tokens():
    torch.manual_seed(0)
    states = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    segments = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1]])
    out = pair_features(states, mask, segments)
    a = torch.stack([states[0, :2].mean(0), states[1, :4].mean(0)])
    b = torch.stack([states[0, 2:5].mean(0), states[1, 4:].mean(0)])
    assert torch.allclose(out, torch.cat([a, b, (a - b).abs(), a * b], -1), atol=1e-6)
    # the padding position never counts, whatever it holds
    noisy = states.clone()
    noisy[0, 5] = 100.0
    assert torch.allclose(pair_features(noisy, mask, segments), out)


def test_the_pair_head_reads_four_pooled_widths_and_the_backbone_term_pools_each_text():
    torch.manual_seed(1)
    hidden, mask = torch.randn(2, 5, 3, 32), torch.ones(2, 5, dtype=torch.bool)
    segments = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    net = network("pair", top="last")
    assert net.up.in_features == 4 * net.config.hidden_size and net.top.out.in_features == 4 * 32
    out = net(hidden, mask, None, segments)
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    # which tokens belong to which text changes the output (the mean pooling could not tell)
    other = net(hidden, mask, None, torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]]))
    assert not torch.allclose(out, other)
    with pytest.raises(ValueError, match="token types"):
        net(hidden, mask)


def pair_rows(rng: random.Random, n: int) -> list[tuple]:
    """MRPC-like: label 1 when the second text repeats the first."""
    out = []
    for i in range(n):
        a = [rng.choice(WORDS) for _ in range(5)]
        b = a if i % 2 else [rng.choice(WORDS) for _ in range(5)]
        out.append((" ".join(a), " ".join(b), str(i % 2)))
    return out


@pytest.fixture(scope="module")
def pair_store(tiny_bert, tmp_path_factory):
    rng = random.Random(0)
    data = tmp_path_factory.mktemp("pairs")
    write_tsv(data / "train.tsv", pair_rows(rng, 48), header=("sentence1", "sentence2", "label"))
    write_tsv(data / "dev.tsv", pair_rows(rng, 16), header=("sentence1", "sentence2", "label"))
    out = data / "store"
    extract(ExtractConfig(model=str(tiny_bert), dataset=str(data), out=str(out), device="cpu", max_length=32,
                          store_dtype="fp32"))
    return out


def cfg(store, out, **kw) -> TrainConfig:
    base = {"store": str(store), "out": str(out), "epochs": 2, "batch_size": 8, "reduction_factor": 4,
            "device": "cpu", "seed": 0, "pooling": "pair"}
    return TrainConfig(**{**base, **kw})


def test_a_pair_run_trains_and_equals_the_online_run(pair_store, tmp_path):
    with torch_threads(1):
        cached = train(cfg(pair_store, tmp_path / "cached", top="last"))
        online = train(cfg(pair_store, tmp_path / "online", top="last", online=True))
    assert cached["splits"]["dev"] == online["splits"]["dev"]
    assert [h["train_loss"] for h in cached["history"]] == pytest.approx([h["train_loss"] for h in online["history"]],
                                                                         rel=1e-4)
    mean = train(cfg(pair_store, tmp_path / "mean", pooling="mean", top="last"))
    assert mean["history"][-1]["train_loss"] != cached["history"][-1]["train_loss"]


def test_pair_pooling_is_refused_on_single_texts_stacked_or_not(tiny_store, tmp_path):
    with pytest.raises(TrainConfigError, match="--pooling pair only for a store of sentence pairs.*single texts"):
        train(cfg(tiny_store, tmp_path / "single"))
    from featcache import open_store
    from sidetrain.kinds.registry import kind_for

    store = open_store(str(tiny_store))
    with pytest.raises(TrainConfigError, match="--pooling pair only for a store of sentence pairs"):
        kind_for(store.manifest).stack_member(cfg(tiny_store, tmp_path / "stack"), store, torch.device("cpu"))


@pytest.mark.parametrize("engine", ["fused", "vmap"])
@pytest.mark.parametrize("pooling", ["mean", "pair"])
def test_stacked_pair_members_equal_their_own_runs(pair_store, tmp_path, engine, pooling):
    """A stacked step passes the batch's token types: each pair-pooled member trains as its own `lst train` run."""
    import dataclasses
    import json
    from pathlib import Path

    from sidetrain.search.stacked import train_stacked

    def losses(run: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (run / "train_log.jsonl").read_text().splitlines()]

    settings = [{"seed": 0, "lr": 3e-3}, {"seed": 1, "lr": 1e-2}]
    cfgs = [cfg(pair_store, tmp_path / f"stk{i}", dropout=0.0, pooling=pooling, **s) for i, s in enumerate(settings)]
    with torch_threads(1):
        train_stacked(cfgs, engine=engine)
        for i, c in enumerate(cfgs):
            recorded = json.loads((Path(c.out) / "config.json").read_text())  # the stack's batch order included
            fields = {f.name for f in dataclasses.fields(TrainConfig)}
            own = train(TrainConfig(**{**{k: v for k, v in recorded.items() if k in fields}, "out": str(tmp_path / f"own{i}")}))
            assert losses(Path(c.out)) == pytest.approx(losses(tmp_path / f"own{i}"), rel=1e-4)
            assert json.loads((Path(c.out) / "predictions.json").read_text()) == \
                json.loads((tmp_path / f"own{i}" / "predictions.json").read_text())
            assert own["steps"] > 0


def test_lst_predict_on_a_pair_run_labels_as_the_cached_evaluation(pair_store, tmp_path):
    """Live text through `lst predict` (the backbone's token types as the segments) == the run's dev predictions."""
    import json

    from sidetrain.predict import predict_lines

    run = tmp_path / "run"
    with torch_threads(1):
        train(cfg(pair_store, run, top="last"))
    data = pair_store.parent
    lines = [line for line in (data / "dev.tsv").read_text().splitlines()[1:]]
    texts = ["\t".join(line.split("\t")[:2]) for line in lines]
    names = json.loads((run / "config.json").read_text())["store_manifest"]["task"]["label_names"]
    cached = [names[i] for i in json.loads((run / "predictions.json").read_text())["dev"]]
    assert predict_lines(str(run), texts, device="cpu") == cached


def test_auto_pooling_is_pair_on_marked_pairs_and_mean_elsewhere(tiny_store, pair_store, tmp_path):
    """The default --pooling auto: pair on a store of marked sentence pairs, mean on single texts; RUN/config.json
    records the resolved pooling (what `lst predict` rebuilds), stacked or not."""
    import json

    from sidetrain import LadderModel
    from sidetrain.search.stacked import train_stacked

    assert TrainConfig(store="s", out="o").pooling == "auto"
    pair = train(cfg(pair_store, tmp_path / "auto", pooling="auto"))
    explicit = train(cfg(pair_store, tmp_path / "pair", pooling="pair"))
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["pooling"] == "pair"
    assert pair["history"] == [{**h, "seconds": a["seconds"], "data_wait_fraction": a["data_wait_fraction"]}
                               for h, a in zip(explicit["history"], pair["history"])]
    single = train(cfg(tiny_store, tmp_path / "single", pooling="auto"))
    assert json.loads((tmp_path / "single" / "config.json").read_text())["pooling"] == "mean"
    assert single["steps"] > 0
    train_stacked([cfg(pair_store, tmp_path / "stk0", pooling="auto", dropout=0.0),
                   cfg(pair_store, tmp_path / "stk1", pooling="auto", dropout=0.0, seed=1)])
    assert json.loads((tmp_path / "stk0" / "config.json").read_text())["pooling"] == "pair"
    dev = [line.split("\t") for line in (pair_store.parent / "dev.tsv").read_text().splitlines()[1:3]]
    texts = [f"{a}\t{b}" for a, b, _ in dev]
    assert len(LadderModel.from_pretrained(tmp_path / "auto", device="cpu").predict(texts)) == 2
    assert len(LadderModel.from_pretrained(tmp_path / "single", device="cpu").predict(["one text"])) == 1
