"""The LST side network for encoder-decoder backbones (T5; docs/design.md section 1).

    side encoder (input x, backbone encoder states h_0..h_L):
        s = W_e h_0 + b_e;  for j, i in K_enc: s = mu_j s + (1 - mu_j)(W_j h_i + b_j); s = T5Block_j(s)
        enc = LN(s)                                              # (B, T, d/r)
    side decoder (target y shifted right, backbone decoder states g_0..g_L teacher-forced on y):
        t = W'_e g_0 + b'_e;  for j, i in K_dec: t = mu'_j t + (1 - mu'_j)(W'_j g_i + b'_j)
                              t = T5Block'_j(t, causal, cross-attending to enc)
        states = Up(LN(t)) * d^-0.5                             # (N, U, d): what forward returns
        logits = LMHead(states)                                  # (N, U, vocab), LM head frozen

The loss and candidate scores need log p(target token) only: `target_log_probs` builds the logits of
CHUNK_TOKENS target tokens at a time (never N x U x vocab: 77 banking candidates x 64 examples x 8
tokens x 32k vocab were 5 GB of logits per eval batch, and log_softmax as much again), and the loss
recomputes each chunk's logits in backward instead of keeping them (activation checkpointing).

Side blocks are transformers' T5Block built from the backbone config with d_model, d_ff and d_kv
divided by r and the head count kept, so block 0's relative-position bias (buckets x heads) has the
backbone's shape and starts as a copy of it. The LM head and both biases come from the store. The
ladders (and their gates) are the encoder-only network's (sidetrain/networks/ladders.py), one set per stack.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from featcache.errors import TrainConfigError, expected

from .ladders import Ladders, mix

if TYPE_CHECKING:
    from .side_config import SideConfig


def reduction_rule(backbone_config) -> tuple[list[int], str]:
    """Every r in 2..64 that gives a T5 side network (d_model, d_kv and d_ff divisible by r), and why."""
    d, d_kv, d_ff = int(backbone_config.d_model), int(backbone_config.d_kv), int(backbone_config.d_ff)
    return [r for r in range(2, 65) if not (d % r or d_kv % r or d_ff % r)], \
        f"divide d_model {d}, d_kv {d_kv} and d_ff {d_ff}"


def side_t5_config(backbone_config, reduction_factor: int, n_enc: int, n_dec: int, dropout: float):
    """The backbone T5 config at width d/r: d_model, d_ff and d_kv divided by r, same heads."""
    d, d_kv, d_ff = int(backbone_config.d_model), int(backbone_config.d_kv), int(backbone_config.d_ff)
    r = reduction_factor
    if d % r or d_kv % r or d_ff % r:
        good, rule = reduction_rule(backbone_config)
        raise TrainConfigError(expected(f"--reduction-factor to {rule}", r, f"Try one of {good}."))
    cfg = copy.deepcopy(backbone_config)
    cfg.d_model, cfg.d_kv, cfg.d_ff = d // r, d_kv // r, d_ff // r
    cfg.num_layers, cfg.num_decoder_layers = n_enc, n_dec
    cfg.dropout_rate = dropout
    cfg.vocab_size = 2  # side blocks never embed tokens
    cfg.use_cache = False
    cfg._attn_implementation = "eager"  # T5 adds the bias and the mask to the scores: one code path, exact
    return cfg


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask (..., K) True = attend -> additive float mask: 0 or the dtype's minimum."""
    return (~mask).to(dtype) * torch.finfo(dtype).min


class T5LadderSideNetwork(nn.Module):
    """`lm_head` (vocab, d) and `scale_output` (d^-0.5 before it): the backbone's; `relative_bias`: the
    backbone's relative-position tables block 0 of each stack starts from ("encoder", "decoder"; empty: T5 init).
    `encoder`, `decoder`: each stack's options (stored and kept layers); r and dropout are the encoder's, and
    the decoder's must equal them (one side width)."""

    def __init__(self, backbone_config, lm_head: torch.Tensor, scale_output: bool,
                 relative_bias: dict[str, torch.Tensor], encoder: SideConfig, decoder: SideConfig) -> None:
        super().__init__()
        from transformers.models.t5.modeling_t5 import T5Block, T5LayerNorm

        if (decoder.reduction_factor, decoder.dropout) != (encoder.reduction_factor, encoder.dropout):
            raise ValueError("The T5 side encoder and decoder share one reduction factor and dropout; got "
                             f"{(encoder.reduction_factor, encoder.dropout)} and "
                             f"{(decoder.reduction_factor, decoder.dropout)}.")
        reduction_factor, dropout = encoder.reduction_factor, encoder.dropout
        enc_kept, dec_kept = list(encoder.kept_layers), list(decoder.kept_layers)
        self.enc_kept, self.dec_kept = enc_kept, dec_kept
        self.config = side_t5_config(backbone_config, reduction_factor, len(enc_kept), len(dec_kept), dropout)
        enc_cfg, dec_cfg = copy.deepcopy(self.config), copy.deepcopy(self.config)
        enc_cfg.is_decoder, dec_cfg.is_decoder = False, True
        d, ds = int(backbone_config.d_model), self.config.d_model
        self.enc_ladders = Ladders(d, ds, encoder.stored_layers, enc_kept)
        self.dec_ladders = Ladders(d, ds, decoder.stored_layers, dec_kept)
        self.enc_blocks = nn.ModuleList(T5Block(enc_cfg, has_relative_attention_bias=i == 0, layer_idx=i)
                                        for i in range(len(enc_kept)))
        self.dec_blocks = nn.ModuleList(T5Block(dec_cfg, has_relative_attention_bias=i == 0, layer_idx=i)
                                        for i in range(len(dec_kept)))
        eps = float(backbone_config.layer_norm_epsilon)
        self.enc_norm, self.dec_norm = T5LayerNorm(ds, eps), T5LayerNorm(ds, eps)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(ds, d)
        self.out_scale = d ** -0.5 if scale_output else 1.0
        self.register_buffer("lm_head", lm_head.float(), persistent=False)  # (vocab, d): frozen, kept in the store
        self._init_blocks(relative_bias)

    def _init_blocks(self, relative_bias: dict[str, torch.Tensor]) -> None:
        """T5's own init for the blocks (std from the side width), then the backbone's relative biases."""
        from transformers.models.t5.modeling_t5 import T5Attention, T5DenseActDense, T5DenseGatedActDense

        dm, dkv, h, dff = self.config.d_model, self.config.d_kv, self.config.num_heads, self.config.d_ff
        for m in self.modules():
            if isinstance(m, T5Attention):
                nn.init.normal_(m.q.weight, std=(dm * dkv) ** -0.5)
                for lin in (m.k, m.v):
                    nn.init.normal_(lin.weight, std=dm ** -0.5)
                nn.init.normal_(m.o.weight, std=(h * dkv) ** -0.5)
                if m.has_relative_attention_bias:
                    nn.init.normal_(m.relative_attention_bias.weight, std=dm ** -0.5)
            elif isinstance(m, T5DenseActDense):
                nn.init.normal_(m.wi.weight, std=dm ** -0.5)
                nn.init.normal_(m.wo.weight, std=dff ** -0.5)
            elif isinstance(m, T5DenseGatedActDense):
                nn.init.normal_(m.wi_0.weight, std=dm ** -0.5)
                nn.init.normal_(m.wi_1.weight, std=dm ** -0.5)
                nn.init.normal_(m.wo.weight, std=dff ** -0.5)
        # Same head count and buckets as the backbone, so the (buckets, heads) table copies as is.
        for part, blocks in (("encoder", self.enc_blocks), ("decoder", self.dec_blocks)):
            if part in relative_bias:
                table = blocks[0].layer[0].SelfAttention.relative_attention_bias.weight
                if table.shape != relative_bias[part].shape:
                    raise TrainConfigError(expected(f"a {part} relative bias of shape {tuple(table.shape)}",
                                                    tuple(relative_bias[part].shape)))
                with torch.no_grad():
                    table.copy_(relative_bias[part])

    def encode(self, enc_hidden: torch.Tensor, enc_mask: torch.Tensor,
               appended: torch.Tensor | None = None, appended_mask: torch.Tensor | None = None) -> torch.Tensor:
        """enc_hidden (B, T, n_enc_stored, d), enc_mask (B, T) bool -> side encoder output (B, T, ds).

        `appended` (B, V, ds): side tokens after the text (VL-T5's visual tokens; `appended_mask` (B, V) bool,
        default all real) -> output (B, T + V, ds). The backbone saw the text alone, so its ladders are zero
        over those positions, and the relative position bias is the text's, zero between any other pair."""
        s, ladders, gates = self.enc_ladders(enc_hidden)
        bias = None
        if appended is not None:
            t, v = s.shape[1], appended.shape[1]
            s = torch.cat([s, appended.to(s.dtype)], dim=1)
            ladders = F.pad(ladders, (0, 0, 0, 0, 0, v))  # (B, T + V, K, ds): zero at the appended positions
            real = torch.ones(appended.shape[:2], dtype=torch.bool, device=s.device)
            enc_mask = torch.cat([enc_mask, real if appended_mask is None else appended_mask], dim=1)
            attention = self.enc_blocks[0].layer[0].SelfAttention
            bias = F.pad(attention.compute_bias(t, t, device=s.device), (0, v, 0, v)).to(s.dtype)
        s = self.dropout(s)
        mask = _additive(enc_mask[:, None, None, :], s.dtype)  # (B, 1, 1, T)
        for j, block in enumerate(self.enc_blocks):
            s = mix(s, ladders, gates, j)
            s, bias, _ = block(s, attention_mask=mask, position_bias=bias)
        return self.dropout(self.enc_norm(s))

    def side_encoding(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's side encoder output and its mask (decoding's `Encoded`); a VL-T5 network adds the images."""
        return self.encode(batch.enc_hidden, batch.enc_mask), batch.enc_mask

    def decode(self, dec_hidden: torch.Tensor, dec_mask: torch.Tensor, enc_out: torch.Tensor,
               enc_mask: torch.Tensor) -> torch.Tensor:
        """dec_hidden (N, U, n_dec_stored, d), dec_mask (N, U), enc_out (N, T, ds), enc_mask (N, T)
        -> the states the frozen LM head reads (N, U, d): `logits(states)` or `target_log_probs`."""
        t, ladders, gates = self.dec_ladders(dec_hidden)
        t = self.dropout(t)
        u = t.shape[1]
        causal = torch.tril(torch.ones(u, u, dtype=torch.bool, device=t.device))
        self_mask = _additive(causal[None, None] & dec_mask[:, None, None, :], t.dtype)  # (N, 1, U, U)
        cross_mask = _additive(enc_mask[:, None, None, :], t.dtype)  # (N, 1, 1, T)
        bias = cross_bias = None
        for j, block in enumerate(self.dec_blocks):
            t = mix(t, ladders, gates, j)
            t, bias, cross_bias = block(t, self_mask, bias, enc_out, cross_mask, cross_bias)
        t = self.dropout(self.dec_norm(t))
        return self.up(t) * self.out_scale  # (N, U, d)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., vocab): for a few positions only (generation); scores use target_log_probs."""
        return states @ self.lm_head.T

    def forward(self, enc_hidden: torch.Tensor, enc_mask: torch.Tensor, dec_hidden: torch.Tensor,
                dec_mask: torch.Tensor, row_example: torch.Tensor) -> torch.Tensor:
        """Decoder row n reads example row_example[n]'s encoding -> states (N, U, d) (see `decode`)."""
        enc_out = self.encode(enc_hidden, enc_mask)
        return self.decode(dec_hidden, dec_mask, enc_out[row_example], enc_mask[row_example])


CHUNK_TOKENS = 1024  # target tokens whose full-vocabulary logits exist at once: 1024 x 32k fp32 = 128 MiB


def _chunk_logits(states: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    return (states @ lm_head.T).float()  # under autocast: the bf16 matmul the unchunked head did


def target_log_probs(states: torch.Tensor, lm_head: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                     chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """log p(targets[n, u]) for every real target token (N, U), 0 at padding. The logits of at most
    `chunk` tokens exist at a time (with their log_softmax: 2 x chunk x vocab floats); row by row the
    same sums as log_softmax over the whole (N, U, vocab) logits."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=states.device)
    where = mask.nonzero(as_tuple=True)
    h, y = states[where], targets[where]  # (M, d), (M,): real tokens only
    parts = [torch.log_softmax(_chunk_logits(h[lo:lo + chunk], lm_head), dim=-1)
             .gather(-1, y[lo:lo + chunk, None]).squeeze(-1) for lo in range(0, len(y), chunk)]
    if parts:
        out[where] = torch.cat(parts)
    return out


def _chunk_nll(states: torch.Tensor, lm_head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_chunk_logits(states, lm_head), targets, reduction="sum")


def target_loss(states: torch.Tensor, lm_head: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Teacher-forced cross-entropy, mean over the real target tokens of the batch. Up to `chunk` tokens:
    one cross_entropy; more: chunk by chunk, each chunk's logits recomputed in backward rather than kept
    (so training holds O(chunk x vocab), not O(tokens x vocab))."""
    h, y = states[mask], targets[mask]
    if len(y) <= chunk:
        return F.cross_entropy(_chunk_logits(h, lm_head), y)
    from torch.utils.checkpoint import checkpoint

    total = sum(checkpoint(_chunk_nll, h[lo:lo + chunk], lm_head, y[lo:lo + chunk], use_reentrant=False)
                for lo in range(0, len(y), chunk))
    return total / len(y)


def sequence_scores(states: torch.Tensor, lm_head: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                    chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Sum of log-probabilities of each row's target: (N,), in bounded memory (`target_log_probs`)."""
    return target_log_probs(states, lm_head, targets, mask, chunk).sum(-1)
