"""LST side networks for image stores (docs/images.md).

Vision transformer backbones (ViT, DeiT, DINOv2, CLIP/SigLIP towers): as for text encoders (design.md 1):

    s = W_emb h_0 + b_emb                                 # embedding ladder over every token (CLS + patches)
    for j, i in enumerate(K):                             # kept backbone layers
        s = mu_j * s + (1 - mu_j) * (W_j h_i + b_j)       # ladder j, d -> d/r, mu_j = sigmoid(alpha_j / T)
        s = SideBlock_j(s)                                # the backbone family's own block at width d/r
    out = Head(pool(LayerNorm(s)))

CNN backbones (EfficientNet-Lite): the stored token of grid cell c is [stem | stage 1 | ... | stage 7 | head]
pooled to the last grid. Each stored stage k gets its own ladder Linear(C_k -> d/r) (d = the widest stored map,
1280 for the head), the stem's ladder plus a learned position embedding starts the stream, and ViT blocks at
width d/r (the CNN has no transformer family of its own) run over the grid cells:

    s = W_0 x_0 + b_0 + pos                               # stem ladder + cell positions
    for j, k in enumerate(K):                             # kept stages (1..8 by default)
        s = mu_j * s + (1 - mu_j) * (W_k x_k + b_k)       # stage k's ladder, C_k -> d/r
        s = ViTBlock_j(s)
    out = Head(pool(LayerNorm(s)))
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from featcache.errors import TrainConfigError, expected

from ...networks.family import FF_WIDTH_FIELDS, set_heads_and_dropout
from ...networks.ladders import GATE_TEMPERATURE, Ladders, mix
from ...networks.top import backbone_top

if TYPE_CHECKING:
    from ...networks.side_config import SideConfig

CNN_HEAD_DIM = 32  # default side heads on a CNN: width / 32 (a ViT-like head size)


def cnn_heads(width: int) -> int:
    """Default side heads on a CNN: the largest divisor of the side width up to width / 32."""
    return max(h for h in range(1, max(1, width // CNN_HEAD_DIM) + 1) if width % h == 0)


def reduction_rule(width: int, heads: int) -> tuple[list[int], str]:
    return [r for r in range(2, 65) if width % r == 0 and (width // r) % heads == 0], \
        f"divide width {width} into {heads} heads"


def _check_width(d: int, r: int, heads: int, flag: str) -> int:
    if d % r or (d // r) % heads:
        good = reduction_rule(d, heads)[0]
        raise TrainConfigError(expected(f"--reduction-factor r with width {d}/r divisible by {heads} heads ({flag})",
                                        r, f"Try --reduction-factor in {good}, or another --side-heads."))
    return d // r


def vision_side_config(config, side: SideConfig):
    """The backbone's vision config with width, feed-forward width and head size divided by r, one block per
    kept layer."""
    reduction_factor, num_heads, num_blocks = side.reduction_factor, side.num_heads, len(side.kept_layers)
    d = int(config.hidden_size)
    heads = int(num_heads or config.num_attention_heads)
    width = _check_width(d, reduction_factor, heads, "--side-heads" if num_heads else "the backbone's heads")
    cfg = copy.deepcopy(config)
    cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers = width, heads, num_blocks
    for f in FF_WIDTH_FIELDS:  # families with mlp_ratio (DINOv2) scale with the width by themselves
        if isinstance(getattr(cfg, f, None), int):
            setattr(cfg, f, max(1, int(getattr(config, f)) // reduction_factor))
    set_heads_and_dropout(cfg, width, heads, side)
    return cfg


def family_blocks(config, n: int) -> nn.ModuleList:
    """n transformer blocks of the config's family (the block list of a model built from it)."""
    from transformers import AutoModel

    try:
        model = AutoModel.from_config(config, attn_implementation="sdpa")
    except ValueError:
        model = AutoModel.from_config(config, attn_implementation="eager")
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise TrainConfigError(f"Could not find the {n} transformer blocks inside {type(model).__name__}; this vision "
                           "family is not supported by the image side network.")


def run_block(block: nn.Module, s: torch.Tensor) -> torch.Tensor:
    out = block(s, None)  # every token is real: no attention mask
    return out[0] if isinstance(out, tuple) else out


class Head(nn.Module):
    """LayerNorm, pooling (mean over tokens, or the first token), then up to d, tanh, dropout, out."""

    def __init__(self, ds: int, d: int, num_outputs: int, dropout: float, pooling: str, eps: float) -> None:
        super().__init__()
        self.pooling = pooling
        self.norm = nn.LayerNorm(ds, eps=eps)
        self.up = nn.Linear(ds, d)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(d, num_outputs)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        s = self.norm(s)
        pooled = s[:, 0] if self.pooling == "cls" else s.mean(1)
        return self.out(self.dropout(torch.tanh(self.up(pooled))))


class VisionTransformerSide(nn.Module):
    """Ladders from the stored layers of a vision transformer into its family's blocks at width d/r."""

    def __init__(self, backbone_config, side: SideConfig) -> None:
        super().__init__()
        self.kept_layers = list(side.kept_layers)
        self.config = vision_side_config(backbone_config, side)
        d, ds = int(backbone_config.hidden_size), int(self.config.hidden_size)
        self.ladders = Ladders(d, ds, side.stored_layers, self.kept_layers)
        self.blocks = family_blocks(self.config, len(self.kept_layers))
        eps = float(getattr(backbone_config, "layer_norm_eps", 1e-12))
        self.head = Head(ds, d, side.num_outputs, side.dropout, side.pooling, eps)
        self.top = backbone_top(d, len(side.stored_layers), side.num_outputs, side.top, side.dropout, eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, T, n_stored, d) -> (B, num_outputs); every token of an image is real."""
        s, ladders, gates = self.ladders(hidden)
        for j, block in enumerate(self.blocks):
            s = run_block(block, mix(s, ladders, gates, j))
        logits = self.head(s)
        return logits if self.top is None else self.top(logits, hidden, None)


class ConvSide(nn.Module):
    """Per-stage ladders from a CNN's pooled stage maps into ViT blocks over the grid cells. `widths`, `starts`:
    each stored stage's channels and where they start in a token; `side.stored_layers`: the stored stages."""

    def __init__(self, widths: list[int], starts: list[int], tokens: int, side: SideConfig) -> None:
        super().__init__()
        from transformers import ViTConfig

        stages, r, dropout = list(side.stored_layers), side.reduction_factor, side.dropout
        self.kept_layers = list(side.kept_layers)
        d = max(widths)
        heads = side.num_heads or cnn_heads(d // max(1, r))
        ds = _check_width(d, r, heads, "--side-heads" if side.num_heads else "the default heads")
        self.spans = {k: (starts[i], starts[i] + widths[i]) for i, k in enumerate(stages)}
        self.embed = nn.Linear(widths[stages.index(0)], ds)
        self.position = nn.Parameter(torch.zeros(1, tokens, ds))
        nn.init.normal_(self.position, std=0.02)
        self.stage_ladders = nn.ModuleList(nn.Linear(widths[stages.index(k)], ds) for k in self.kept_layers)
        self.alpha = nn.Parameter(torch.zeros(len(self.kept_layers)))
        self.config = ViTConfig(hidden_size=ds, num_hidden_layers=len(self.kept_layers), num_attention_heads=heads,
                                intermediate_size=4 * ds, hidden_dropout_prob=dropout,
                                attention_probs_dropout_prob=side.attention_dropout, image_size=8, patch_size=8)
        self.blocks = family_blocks(self.config, len(self.kept_layers))
        self.head = Head(ds, d, side.num_outputs, dropout, side.pooling, 1e-6)
        # the backbone term reads the stored token whole (every stored stage, pooled over the cells: the probe's)
        self.top = backbone_top(starts[-1] + widths[-1], 1, side.num_outputs, side.top, dropout, 1e-6)

    def _stage(self, x: torch.Tensor, k: int) -> torch.Tensor:
        a, z = self.spans[k]
        return x[..., a:z]

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, cells, 1, sum of widths) -> (B, num_outputs)."""
        x = hidden[:, :, 0]
        s = self.embed(self._stage(x, 0)) + self.position
        gates = torch.sigmoid(self.alpha / GATE_TEMPERATURE)
        for j, (k, ladder, block) in enumerate(zip(self.kept_layers, self.stage_ladders, self.blocks)):
            s = gates[j] * s + (1 - gates[j]) * ladder(self._stage(x, k))
            s = run_block(block, s)
        logits = self.head(s)
        return logits if self.top is None else self.top(logits, hidden, None)
