"""Vision-language training (#13): the side network (image tokens as a side prefix, no ladder input at the
visual positions), cached == online in fp32 (tiny random backbones, and the bundled MiniLM + EfficientNet-Lite0
on a few rows), the question-only probe, resume after kill -9, lst predict with --image, bad inputs."""

from __future__ import annotations

import torch
from transformers import BertConfig

from sidetrain.kinds.vision_language.model import VisionLanguageSide
from sidetrain.ladders import GATE_TEMPERATURE


def tiny_side(**kw) -> VisionLanguageSide:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return VisionLanguageSide(config, 5, [0, 1, 2], None, image_width=24, image_tokens=6, reduction_factor=4,
                              dropout=0.0, **kw).eval()


def test_visual_positions_get_no_ladder_input():
    model = tiny_side()
    with torch.no_grad():
        model.text.ladders.alpha.copy_(torch.tensor([0.05, -0.1]))  # gates away from 0.5: the test sees them
    torch.manual_seed(1)
    hidden, image = torch.randn(3, 7, 3, 32), torch.randn(3, 6, 1, 24)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:] = False
    inputs, outputs = [], []
    for block in model.text.blocks:
        block.register_forward_pre_hook(
            lambda m, a, k: inputs.append((a[0] if a else k["hidden_states"]).detach()), with_kwargs=True)
        block.register_forward_hook(lambda m, a, o: outputs.append((o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        model(hidden, mask, image)
        before = [model.visual(image[:, :, 0])] + outputs[:-1]  # the side stream entering each mix
        gates = torch.sigmoid(model.text.ladders.alpha / GATE_TEMPERATURE)
        _, ladders, _ = model.text.ladders(hidden)
    text_start = model.text.ladders.embed(hidden[:, :, 0])
    for j, (got, prev) in enumerate(zip(inputs, before)):
        # visual positions (the 6 in front): the gate scales the side stream, no ladder term is added
        torch.testing.assert_close(got[:, :6], gates[j] * prev[:, :6], rtol=1e-6, atol=1e-6)
        # text positions: mu * s + (1 - mu) * ladder_j, as in the encoder side network
        stream = text_start if j == 0 else prev[:, 6:]
        torch.testing.assert_close(got[:, 6:], gates[j] * stream + (1 - gates[j]) * ladders[:, :, j],
                                   rtol=1e-5, atol=1e-6)
