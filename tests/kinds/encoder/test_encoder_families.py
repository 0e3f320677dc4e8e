"""The encoder side network reads any transformers encoder family from its config (no per-family code):
side blocks of the family's own kind at width d/r, padding masked the family's way, ladders in use."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from featcache.errors import TrainConfigError
from sidetrain.networks.encoder_stack import LadderSideNetwork
from sidetrain.networks.side_config import SideConfig

BERT_STYLE = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 64}
FAMILIES = {
    "bert": BERT_STYLE,
    "roberta": BERT_STYLE,
    "electra": {**BERT_STYLE, "embedding_size": 16},
    "mpnet": BERT_STYLE,  # relative position bias computed by the family's encoder
    "distilbert": {"dim": 32, "n_heads": 4, "n_layers": 2, "hidden_dim": 64},  # other field names
    "deberta-v2": {**BERT_STYLE, "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                   "position_buckets": 8, "max_relative_positions": 16},
}


def side_options(stored: list[int], kept: list[int], dropout: float) -> SideConfig:
    """3 outputs at r = 2, mean pooling, the backbone's heads."""
    return SideConfig(num_outputs=3, stored_layers=stored, kept_layers=kept, reduction_factor=2, dropout=dropout,
                      attention_dropout=0.0, pooling="mean", num_heads=None, top="side")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_side_network_for_family(family, one_thread):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, **FAMILIES[family])
    net = LadderSideNetwork(cfg, side_options([0, 1, 2], [1, 2], dropout=0.0)).eval()
    assert type(net.blocks[0]).__module__ == type(net.side).__module__  # the family's own block class
    shapes = {tuple(p.shape) for p in net.blocks.parameters() if p.ndim == 2}
    assert shapes == {(16, 16), (32, 16), (16, 32)}  # d/r = 16 and d_ff/r = 32, nothing at full width
    hidden, mask = torch.randn(2, 5, 3, 32), torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    out = net(hidden, mask)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    padded = hidden.clone()
    padded[1, 3:] = 100.0
    assert torch.allclose(net(padded, mask), out, atol=1e-5)  # padding is masked
    for layer in range(3):  # every ladder (and the embedding ladder) reaches the output
        changed = hidden.clone()
        changed[0, :, layer] += 1.0
        assert not torch.allclose(net(changed, mask)[0], out[0], atol=1e-4), layer
    out.sum().backward()
    assert net.ladder_weight.grad.abs().sum() > 0 and net.gate_alpha.grad is not None
    # the side model's own embeddings never run (the embedding ladder replaces their output)
    calls = []
    net.side.embeddings.register_forward_hook(lambda m, a, o: calls.append(o), prepend=True)
    net(hidden, mask)
    assert calls == [None]


def test_ladders_read_a_slice_or_a_gather_alike(one_thread):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("bert", **BERT_STYLE, num_labels=3)
    hidden, mask = torch.randn(2, 5, 4, 32), torch.ones(2, 5, dtype=torch.bool)
    side_by_side = LadderSideNetwork(cfg, side_options([0, 1, 2, 3], [2, 3], dropout=0.0)).eval()
    assert side_by_side._ladder_slice == slice(2, 4)
    out = side_by_side(hidden, mask)
    side_by_side._ladder_slice = None  # the gather path
    torch.testing.assert_close(side_by_side(hidden, mask), out)
    assert LadderSideNetwork(cfg, side_options([0, 1, 2, 3], [1, 3], dropout=0.1))._ladder_slice is None


def test_unsupported_family_is_named():
    cfg = AutoConfig.for_model("albert", **BERT_STYLE, embedding_size=16)  # one block shared by all layers
    with pytest.raises(TrainConfigError, match="AlbertModel"):
        LadderSideNetwork(cfg, side_options([0, 1, 2], [1, 2], dropout=0.1))
