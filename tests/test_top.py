"""`--top`: what the classifier reads (sidetrain/networks/top.py). `side` builds LST's network exactly as
before; `last` and `layers` add the backbone's own pooled states through a learned gate, over the text's
real tokens only, for every kind with a classification head; T5 refuses them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import torch_threads
from transformers import BertConfig

from featcache.errors import TrainConfigError
from sidetrain import TrainConfig, train
from sidetrain.kinds.image.model import ConvSide
from sidetrain.networks.encoder_stack import LadderSideNetwork
from sidetrain.networks.side_config import SideConfig
from sidetrain.networks.top import GATE_START

CONFIG = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=50)


def side(top: str, stored: list[int] | None = None, kept: list[int] | None = None) -> SideConfig:
    return SideConfig(num_outputs=3, stored_layers=stored or [0, 1, 2], kept_layers=kept or [1, 2],
                      reduction_factor=4, dropout=0.0, attention_dropout=0.0, pooling="mean", num_heads=None, top=top)


def network(top: str) -> LadderSideNetwork:
    torch.manual_seed(0)
    return LadderSideNetwork(CONFIG, side(top)).eval()


def test_side_is_lsts_network_unchanged_and_the_gates_add_only_their_own_parameters():
    base = network("side")
    assert base.top is None
    for top, extra in (("last", {"top.norm.weight", "top.norm.bias", "top.out.weight", "top.out.bias", "top.gate"}),
                       ("layers", {"top.norm.weight", "top.norm.bias", "top.out.weight", "top.out.bias", "top.gate",
                                   "top.mix"})):
        net = network(top)
        assert set(net.state_dict()) - set(base.state_dict()) == extra
        # the side network's own weights are drawn first, from the same stream: the same numbers
        for name, value in base.state_dict().items():
            assert torch.equal(net.state_dict()[name], value), name


def test_the_gate_mixes_the_side_logits_with_the_pooled_last_layer_of_real_tokens():
    net = network("last")
    torch.manual_seed(1)
    hidden, mask = torch.randn(2, 5, 3, 32), torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    out = net(hidden, mask)
    base = network("side")
    side_logits = base(hidden, mask)
    g = torch.sigmoid(torch.tensor(GATE_START))
    pooled = torch.stack([hidden[0, :, -1].mean(0), hidden[1, :3, -1].mean(0)])
    expected = (1 - g) * side_logits + g * net.top.out(net.top.norm(pooled))
    assert torch.allclose(out, expected, atol=1e-5)
    # padding never reaches the backbone term: other values there, same output
    noisy = hidden.clone()
    noisy[1, 3:] = 1e3
    assert torch.allclose(net(noisy, mask), out, atol=1e-5)


def test_layers_mixes_every_stored_layer_equally_at_start():
    net = network("layers")
    hidden, mask = torch.randn(2, 4, 3, 32), torch.ones(2, 4, dtype=torch.bool)
    assert torch.allclose(net.top.pooled(hidden, mask), hidden.mean(2).mean(1), atol=1e-6)
    with torch.no_grad():
        net.top.mix.copy_(torch.tensor([-1e4, -1e4, 0.0]))  # all the weight on the last stored layer
    assert torch.allclose(net.top.pooled(hidden, mask), hidden[:, :, -1].mean(1), atol=1e-6)


def test_cnn_side_reads_every_stored_stage_in_its_backbone_term():
    torch.manual_seed(0)
    net = ConvSide([8, 16, 24], [0, 8, 24], 4, side("last", stored=[0, 1, 2], kept=[1, 2])).eval()
    hidden = torch.randn(2, 4, 1, 48)
    assert net(hidden).shape == (2, 3) and net.top.norm.normalized_shape == (48,)


@pytest.mark.parametrize("top", ["last", "layers"])
def test_a_run_with_a_gated_top_trains_the_gate_records_it_and_predict_rebuilds_it(tiny_store, tmp_path, top):
    from safetensors.torch import load_file

    from sidetrain.kinds.encoder.predict import Predictor

    with torch_threads(1):
        summary = train(TrainConfig(store=str(tiny_store), out=str(tmp_path / "run"), epochs=2, reduction_factor=4,
                                    device="cpu", top=top, label_smoothing=0.1))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["top"] == top and config["label_smoothing"] == 0.1 and len(summary["history"]) == 2
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert float(weights["top.gate"]) != GATE_START  # trained with the rest
    predictor = Predictor(tmp_path / "run", "cpu")  # loads the weights strictly: the same network rebuilt
    assert predictor.model.top is not None and predictor.model.top.top == top


def test_bad_values_are_refused_naming_the_flag():
    with pytest.raises(TrainConfigError, match="--top"):
        TrainConfig(store="s", out="o", top="middle")
    with pytest.raises(TrainConfigError, match="--label-smoothing"):
        TrainConfig(store="s", out="o", label_smoothing=1.0)
