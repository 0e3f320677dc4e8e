"""The LST side network for encoder-only backbones (DESIGN.md section 1).

    s = W_emb e + b_emb                                   # embedding ladder, d -> d/r
    for j, i in enumerate(K):                             # kept backbone layers
        mu = sigmoid(alpha_j / T)
        s = mu * s + (1 - mu) * (W_j h_i + b_j)           # ladder j, d -> d/r
        s = SideBlock_j(s, mask)                          # a backbone-kind block at width d/r
    out = Head(LayerNorm(s))

Side blocks are built by transformers from a copy of the backbone config scaled by 1/r, so the
block type follows the backbone's family instead of being re-written here.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from featcache.errors import TrainConfigError, expected

GATE_TEMPERATURE = 0.1


def side_config(backbone_config, reduction_factor: int, num_blocks: int, attention_dropout: float,
                dropout: float, num_heads: int | None = None):
    """The backbone config with width, feed-forward width (and head size) divided by r."""
    d = int(backbone_config.hidden_size)
    heads = int(num_heads or backbone_config.num_attention_heads)
    flag = "--side-heads" if num_heads else "the backbone's head count"

    def good() -> list[int]:
        return [r for r in range(2, 65) if d % r == 0 and (d // r) % heads == 0]

    if d % reduction_factor:
        raise TrainConfigError(expected(f"--reduction-factor dividing the width {d}", reduction_factor,
                                        f"Try --reduction-factor in {good()}."))
    width = d // reduction_factor
    if width % heads:
        divisors = [h for h in range(1, width + 1) if width % h == 0]
        raise TrainConfigError(expected(f"a side width {width} (= {d}/r) divisible by {heads} heads ({flag})",
                                        reduction_factor, f"Try --reduction-factor in {good()}, "
                                        f"or --side-heads in {divisors}."))
    cfg = copy.deepcopy(backbone_config)
    cfg.hidden_size = width
    cfg.num_attention_heads = heads
    cfg.intermediate_size = max(1, int(backbone_config.intermediate_size) // reduction_factor)
    cfg.num_hidden_layers = num_blocks
    cfg.hidden_dropout_prob = dropout
    cfg.attention_probs_dropout_prob = attention_dropout
    cfg.vocab_size = 2  # the side model's own embeddings are never used: keep them tiny
    cfg.pad_token_id = 0
    cfg._attn_implementation = "sdpa"
    return cfg


def _block_list(model: nn.Module, n: int) -> nn.ModuleList:
    """The stack of transformer blocks inside a transformers encoder, found by shape, not by name."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise TrainConfigError(f"Could not find the {n} transformer blocks inside {type(model).__name__}; "
                           "this backbone family is not supported by the encoder side network.")


class LadderSideNetwork(nn.Module):
    def __init__(self, backbone_config, num_outputs: int, stored_layers: list[int], kept_layers: list[int],
                 reduction_factor: int = 8, dropout: float = 0.1, attention_dropout: float = 0.0,
                 pooling: str = "mean", num_heads: int | None = None) -> None:
        super().__init__()
        from transformers import AutoModel
        from transformers.masking_utils import create_bidirectional_mask

        if 0 not in stored_layers:
            raise TrainConfigError(expected("layer 0 (the embedding output) in the store for the embedding ladder",
                                            f"stored layers {stored_layers}"))
        blocks = [x for x in stored_layers if x]
        bad = [k for k in kept_layers if k not in blocks]
        if bad or not kept_layers:
            raise TrainConfigError(expected(f"--layers among the stored block layers {blocks}",
                                            f"{kept_layers or 'none'} ({bad or 'none'} out of range)",
                                            "Pick stored layers (0, the embedding output, always feeds the "
                                            "embedding ladder), or re-extract with more --layers."))
        if sorted(set(kept_layers)) != list(kept_layers):
            raise TrainConfigError(expected("--layers in increasing order without repeats", kept_layers))
        self.config = side_config(backbone_config, reduction_factor, len(kept_layers), attention_dropout,
                                  dropout, num_heads)
        d, ds = int(backbone_config.hidden_size), self.config.hidden_size
        self.emb_pos = stored_layers.index(0)
        self.register_buffer("ladder_pos", torch.tensor([stored_layers.index(k) for k in kept_layers]),
                             persistent=False)
        self.kept_layers = list(kept_layers)
        self.pooling = pooling
        self.embed_ladder = nn.Linear(d, ds)
        # All ladder projections in one contraction: (K, d, d/r) weights, (K, d/r) biases.
        self.ladder_weight = nn.Parameter(torch.empty(len(kept_layers), d, ds))
        self.ladder_bias = nn.Parameter(torch.zeros(len(kept_layers), ds))
        nn.init.normal_(self.ladder_weight, std=d ** -0.5)
        self.gate_alpha = nn.Parameter(torch.zeros(len(kept_layers)))  # mu = 0.5 at init
        self.blocks = _block_list(AutoModel.from_config(self.config), len(kept_layers))
        self.norm = nn.LayerNorm(ds, eps=getattr(backbone_config, "layer_norm_eps", 1e-12))
        self.up = nn.Linear(ds, d)
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d, num_outputs)
        self._make_mask = create_bidirectional_mask

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, n_stored, d) backbone states; mask (B, T) bool -> (B, num_outputs)."""
        s = self.embed_ladder(hidden[:, :, self.emb_pos])  # (B, T, ds)
        ladders = torch.einsum("btkd,kds->btks", hidden[:, :, self.ladder_pos], self.ladder_weight) + self.ladder_bias
        attn_mask = self._make_mask(config=self.config, inputs_embeds=s, attention_mask=mask.long())
        gates = torch.sigmoid(self.gate_alpha / GATE_TEMPERATURE)
        for j, block in enumerate(self.blocks):
            s = gates[j] * s + (1 - gates[j]) * ladders[:, :, j]
            out = block(s, attn_mask)
            s = out[0] if isinstance(out, tuple) else out
        s = self.norm(s)
        if self.pooling == "cls":
            pooled = s[:, 0]
        else:
            m = mask.unsqueeze(-1).to(s.dtype)
            pooled = (s * m).sum(1) / m.sum(1).clamp(min=1)  # (B, ds)
        return self.head(self.head_dropout(torch.tanh(self.up(pooled))))
