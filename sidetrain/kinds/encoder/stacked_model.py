"""M encoder side networks computed as one: the fused stack behind `lst sweep --stack` and `train_stacked`.

Every trainable parameter of the M members lives in one (M, P) tensor (`FusedStack.flat`, one row per
member, each row the member's parameters in a fixed order), so the optimiser step, the per-member
gradient norm and a compaction are a few kernels over one tensor. The forward pass reads views of it:

    start   = einsum(h_0, W_emb[m])                       one GEMM for all members
    ladders = einsum(h_K, W_lad[m, j])                    one batched GEMM over the kept layers
    for each block j:                                     post-LN BERT block, members on a leading axis
        x    = mu * s + (1 - mu) * ladder_j
        qkv  = baddbmm(x, [Wq; Wk; Wv][m])                Q, K and V adjacent in the row: one bmm
        a    = SDPA over (batch, members x heads)         every member's attention in one call
        x    = LN(x + dropout(baddbmm(a, Wo[m])))
        x    = LN(x + dropout(baddbmm(act(baddbmm(x, W1[m])), W2[m])))
    logits = head(dropout(tanh(up(pool(LN(s))))))

This reproduces transformers' BERT-family block (BERT, RoBERTa, XLM-R; exact GELU or whatever the
config's `hidden_act` names, the config's LayerNorm eps, padding keys masked) and the side network of
sidetrain/networks/encoder_stack.py around it, so a member computes what `LadderSideNetwork` computes with its weights (tested
against separate `lst train` runs). Other families return None from `fuse` (the caller falls back to
torch.func.vmap). Dropout rates are per member (a (M,) tensor): each member draws its own masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...networks.encoder_stack import LadderSideNetwork
from ...networks.ladders import GATE_TEMPERATURE

FUSED_FAMILIES = ("bert", "roberta", "xlm-roberta")
BLOCK_PARTS = {  # group -> parameter names inside one transformers BERT-family block, adjacent in a row
    "qkv_w": ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight"),
    "qkv_b": ("attention.self.query.bias", "attention.self.key.bias", "attention.self.value.bias"),
    "o_w": ("attention.output.dense.weight",), "o_b": ("attention.output.dense.bias",),
    "ln1_w": ("attention.output.LayerNorm.weight",), "ln1_b": ("attention.output.LayerNorm.bias",),
    "f1_w": ("intermediate.dense.weight",), "f1_b": ("intermediate.dense.bias",),
    "f2_w": ("output.dense.weight",), "f2_b": ("output.dense.bias",),
    "ln2_w": ("output.LayerNorm.weight",), "ln2_b": ("output.LayerNorm.bias",),
}
OUTER_PARTS = {"emb_w": ("ladders.embed.weight",), "emb_b": ("ladders.embed.bias",),
               "lad_w": ("ladders.weight",), "lad_b": ("ladders.bias",), "alpha": ("ladders.alpha",),
               "norm_w": ("norm.weight",), "norm_b": ("norm.bias",), "up_w": ("up.weight",), "up_b": ("up.bias",),
               "head_w": ("head.weight",), "head_b": ("head.bias",)}


@dataclass(frozen=True)
class _Group:
    key: str
    names: tuple[str, ...]  # state-dict names, adjacent in a row
    shapes: tuple[tuple[int, ...], ...]  # each name's shape
    shape: tuple[int, ...]  # the group's shape: names concatenated along dim 0

    @property
    def size(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)


def fusable(model: nn.Module) -> bool:
    """A BERT-family side network whose every trainable parameter the fused stack computes."""
    if not isinstance(model, LadderSideNetwork):
        return False
    cfg = model.config
    if cfg.model_type not in FUSED_FAMILIES or getattr(cfg, "is_decoder", False) or \
            getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return False
    try:
        groups = _groups(model)
    except KeyError:
        return False
    covered = {n for g in groups for n in g.names}
    return covered == {n for n, p in model.named_parameters() if p.requires_grad}


def _groups(model: LadderSideNetwork) -> list[_Group]:
    params = dict(model.named_parameters())
    prefix = next(name for name, module in model.named_modules() if module is model.blocks)
    out = []

    def add(key: str, names: tuple[str, ...]) -> None:
        shapes = tuple(tuple(params[n].shape) for n in names)
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        out.append(_Group(key, names, shapes, shape))

    for key, names in OUTER_PARTS.items():
        add(key, names)
    for j in range(len(model.blocks)):
        for key, names in BLOCK_PARTS.items():
            add(f"{j}.{key}", tuple(f"{prefix}.{j}.{n}" for n in names))
    return out


class FusedStack:
    """The layout and forward pass of M fused side networks (same shape; weights, dropout per member)."""

    def __init__(self, template: LadderSideNetwork) -> None:
        cfg = template.config
        self.groups = _groups(template)
        self.sizes = [g.size for g in self.groups]
        self.width = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.blocks = len(template.blocks)
        self.eps = float(cfg.layer_norm_eps)
        self.norm_eps = float(template.norm.eps)
        from transformers.activations import ACT2FN

        self.act = ACT2FN[cfg.hidden_act] if isinstance(cfg.hidden_act, str) else cfg.hidden_act
        self.pooling = template.pooling
        self.emb_pos = template.ladders.emb_pos
        self.slice = template.ladders.slice
        self.pos = template.ladders.pos

    @classmethod
    def fuse(cls, models: list[nn.Module]) -> FusedStack | None:
        """The fused stack of these members, or None when one of them is not fusable or shapes differ."""
        if not models or not all(fusable(m) for m in models):
            return None
        stack = cls(models[0])
        for m in models[1:]:
            if [g.shapes for g in _groups(m)] != [g.shapes for g in stack.groups] or m.pooling != stack.pooling \
                    or m.kept_layers != models[0].kept_layers or m.config.hidden_act != models[0].config.hidden_act:
                return None
        return stack

    # ------------------------------------------------------------ rows <-> member state dicts

    def row(self, model: nn.Module) -> torch.Tensor:
        """A member's trainable parameters as one row (P,)."""
        params = dict(model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for g in self.groups for n in g.names])

    def state(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """The member state dict (trainable entries, encoder_stack.py's names) held in a row."""
        out = {}
        for g, chunk in zip(self.groups, torch.split(row.detach(), self.sizes)):
            for n, s, piece in zip(g.names, g.shapes, torch.split(chunk, [int(torch.Size(x).numel()) for x in g.shapes])):
                out[n] = piece.reshape(s).clone()
        return out

    # ------------------------------------------------------------ forward

    def forward(self, flat: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, training: bool,
                dropout: torch.Tensor | None = None, attention_dropout: torch.Tensor | float = 0.0,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """flat (M, P); hidden (B, T, n_stored, d); mask (B, T) bool -> logits (M, B, C); `segments` (B, T): the
        token types --pooling pair pools each text by.

        `dropout`: (M,) hidden/head dropout rate per member; `attention_dropout`: one rate for all
        members (a float: SDPA's own dropout) or (M,) rates (attention computed out of SDPA)."""
        n_m = flat.shape[0]
        w = {g.key: c.view(n_m, *g.shape) for g, c in zip(self.groups, torch.split(flat, self.sizes, dim=1))}
        b, t = mask.shape
        ds, heads = self.width, self.heads
        hd = ds // heads
        drop = _Dropout(dropout, n_m) if training and dropout is not None and bool((dropout > 0).any()) else None
        att_p = attention_dropout if training else 0.0
        if isinstance(att_p, torch.Tensor) and not bool((att_p > 0).any()):
            att_p = 0.0
        elif isinstance(att_p, torch.Tensor) and bool((att_p == att_p[0]).all()):
            att_p = float(att_p[0])

        s = torch.einsum("btd,msd->mbts", hidden[:, :, self.emb_pos], w["emb_w"]) + w["emb_b"][:, None, None]
        kept = hidden[:, :, self.slice] if self.slice else hidden[:, :, self.pos]
        ladders = torch.einsum("btkd,mkds->mkbts", kept, w["lad_w"]) + w["lad_b"][:, :, None, None]
        gates = torch.sigmoid(w["alpha"] / GATE_TEMPERATURE)  # (M, K)
        key_mask = mask[:, None, None, :]  # (B, 1, 1, T): padding keys masked for every member and head
        x = None
        for j in range(self.blocks):
            g = gates[:, j].view(n_m, 1, 1, 1)
            x = (g * s + (1 - g) * ladders[:, j]).reshape(n_m, b * t, ds)  # ladders.mix
            qkv = torch.baddbmm(w[f"{j}.qkv_b"][:, None], x, w[f"{j}.qkv_w"].transpose(1, 2))  # (M, BT, 3ds)
            qkv = qkv.view(n_m, b, t, 3, heads, hd).permute(3, 1, 0, 4, 2, 5).reshape(3, b, n_m * heads, t, hd)
            a = self._attention(qkv[0], qkv[1], qkv[2], key_mask, att_p, n_m)  # (B, M*H, T, hd)
            a = a.view(b, n_m, heads, t, hd).permute(1, 0, 3, 2, 4).reshape(n_m, b * t, ds)
            o = torch.baddbmm(w[f"{j}.o_b"][:, None], a, w[f"{j}.o_w"].transpose(1, 2))
            x = _layer_norm(x + (drop(o) if drop else o), w[f"{j}.ln1_w"], w[f"{j}.ln1_b"], self.eps)
            f = self.act(torch.baddbmm(w[f"{j}.f1_b"][:, None], x, w[f"{j}.f1_w"].transpose(1, 2)))
            f = torch.baddbmm(w[f"{j}.f2_b"][:, None], f, w[f"{j}.f2_w"].transpose(1, 2))
            x = _layer_norm(x + (drop(f) if drop else f), w[f"{j}.ln2_w"], w[f"{j}.ln2_b"], self.eps)
            s = x.view(n_m, b, t, ds)
        s = _layer_norm(s, w["norm_w"][:, None], w["norm_b"][:, None], self.norm_eps)  # (M, B, T, ds)
        if self.pooling == "cls":
            pooled = s[:, :, 0]
        elif self.pooling == "pair":  # each text's mean, their difference and product (top.pair_features, per member)
            if segments is None:
                raise ValueError("--pooling pair needs the batch's token types")
            segments = segments.to(mask.device)
            a, c = (_member_mean(s, mask & (segments == 0)), _member_mean(s, mask & (segments != 0)))
            pooled = torch.cat([a, c, (a - c).abs(), a * c], dim=-1)  # (M, B, 4 ds)
        else:
            pooled = _member_mean(s, mask)  # (M, B, ds)
        u = torch.tanh(torch.baddbmm(w["up_b"][:, None], pooled, w["up_w"].transpose(1, 2)))
        return torch.baddbmm(w["head_b"][:, None], drop(u) if drop else u, w["head_w"].transpose(1, 2))

    def _attention(self, q, k, v, key_mask, p, n_m: int) -> torch.Tensor:
        if not isinstance(p, torch.Tensor):  # one rate (0 when off): SDPA's own dropout
            return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=float(p))
        # per-member attention dropout: the softmax written out, a mask drawn per member's rate
        mh, hd = q.shape[1], q.shape[3]
        scores = (q @ k.transpose(-1, -2)) * hd ** -0.5
        scores = scores.masked_fill(~key_mask, float("-inf")).softmax(-1)
        rate = p.repeat_interleave(mh // n_m).view(1, mh, 1, 1)
        keep = (torch.rand_like(scores) >= rate).to(scores.dtype) / (1 - rate)
        return (scores * keep) @ v


class _Dropout:
    """Inverted dropout with one rate per member (leading axis)."""

    def __init__(self, rates: torch.Tensor, n_m: int) -> None:
        self.rates, self.n_m = rates, n_m
        self.scale = 1 / (1 - rates)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.n_m,) + (1,) * (x.dim() - 1)
        keep = torch.rand_like(x) >= self.rates.view(shape)
        return x * keep * self.scale.view(shape)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis with per-member affine weights (M, ..., ds) broadcast from (M, ds)."""
    y = F.layer_norm(x, x.shape[-1:], eps=eps)
    shape = (weight.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return torch.addcmul(bias.reshape(shape), y, weight.reshape(shape))


def _member_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(M, B, T, w) states, (B, T) bool -> (M, B, w): every member's mean over the masked tokens."""
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(2) / m.sum(1).clamp(min=1)
