"""The LST side network over an encoder-only backbone's stored states (docs/design.md section 1): the encoder
kind's network, and the text stream of the vision-language kind's (which adds side tokens in front: `prefix`).

    s = W_emb e + b_emb                                   # embedding ladder, d -> d/r  (sidetrain/networks/ladders.py)
    for j, i in enumerate(K):                             # kept backbone layers
        mu = sigmoid(alpha_j / T)
        s = mu * s + (1 - mu) * (W_j h_i + b_j)           # ladder j, d -> d/r
        s = SideBlock_j(s, mask)                          # a backbone-kind block at width d/r
    out = Head(dropout(tanh(W_up pool(LayerNorm(s)))))    # d/r -> d -> outputs
    out = (1 - g) out + g W LayerNorm(pool(h))            # --top last|layers only (sidetrain/networks/top.py)

The side blocks are a transformers model of the backbone's family, built from a copy of its config
scaled by 1/r (BERT, RoBERTa, ELECTRA, MPNet, DistilBERT, DeBERTa, ...), so the block type, its mask
format and whatever else its blocks need (relative positions) follow the family instead of being
re-written here; hooks feed the ladders in.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import nn

from .family import block_list, build_side_model, side_config
from .ladders import Ladders, mix
from .top import backbone_top, masked_mean, pair_features

if TYPE_CHECKING:
    from .side_config import SideConfig


class LadderSideNetwork(nn.Module):
    """`side`: the run's options, kept layers resolved (SideConfig.resolve); the backbone config: the rest."""

    def __init__(self, backbone_config, side: SideConfig) -> None:
        super().__init__()
        kept_layers = list(side.kept_layers)
        self.config = side_config(backbone_config, side)
        d, ds = int(backbone_config.hidden_size), self.config.hidden_size
        self.kept_layers = kept_layers
        self.pooling = side.pooling
        self.ladders = Ladders(d, ds, side.stored_layers, kept_layers)
        # The side blocks run inside the family's own model forward, so whatever its blocks need besides
        # (hidden, mask) (relative positions in MPNet/DeBERTa, its mask format) is computed the family's way.
        # Hooks put the ladders in: the embeddings' output becomes the embedding ladder's, and block j's
        # input is mixed with ladder j.
        self.side = build_side_model(self.config)
        self.__dict__["blocks"] = block_list(self.side, len(kept_layers))  # a view, not a second registration
        # bound methods (not closures): a deep copy of the network then calls its own copy's hooks
        self.side.embeddings.register_forward_hook(self._embedding_ladder_output)
        for j, block in enumerate(self.blocks):
            block.register_forward_pre_hook(functools.partial(self._mix_ladder, j), with_kwargs=True)
        self._run: dict[str, torch.Tensor] = {}
        self.norm = nn.LayerNorm(ds, eps=getattr(backbone_config, "layer_norm_eps", 1e-12))
        # --pooling pair: both segments' means, their difference and product (4 ds features)
        self.up = nn.Linear(4 * ds if side.pooling == "pair" else ds, d)
        self.head_dropout = nn.Dropout(side.dropout)
        self.head = nn.Linear(d, side.num_outputs)
        # --top last|layers: the backbone's own pooled states beside the side output (networks/top.py)
        self.top = backbone_top(d, len(side.stored_layers), side.num_outputs, side.top, side.dropout,
                                getattr(backbone_config, "layer_norm_eps", 1e-12), side.pooling == "pair")

    @property
    def ladder_weight(self) -> nn.Parameter:
        """(K, d, d/r): the ladder projections of the kept layers."""
        return self.ladders.weight

    @property
    def gate_alpha(self) -> nn.Parameter:
        return self.ladders.alpha

    @property
    def _ladder_slice(self) -> slice | None:
        """Where the kept layers sit side by side in the store (read as a view); None: gathered."""
        return self.ladders.slice

    @_ladder_slice.setter
    def _ladder_slice(self, value: slice | None) -> None:
        self.ladders.slice = value

    def _embedding_ladder_output(self, module, args, output) -> torch.Tensor:
        return self._run["s"]

    def _mix_ladder(self, j: int, module, args, kwargs):
        """Block j's input s -> mu_j * s + (1 - mu_j) * ladder_j."""
        ladders, gates = self._run["ladders"], self._run["gates"]
        if args:
            return (mix(args[0], ladders, gates, j), *args[1:]), kwargs
        kwargs["hidden_states"] = mix(kwargs["hidden_states"], ladders, gates, j)
        return args, kwargs

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, T, n_stored, d) backbone states; mask (B, T) bool -> (B, num_outputs).

        `prefix` (B, P, ds): extra side tokens before the text (the VL kind's projected image tokens). They
        have no backbone states, so their ladder input is zero (the gate only scales them, as in VL-T5's
        LST), they are always attended to, and mean pooling covers them."""
        s, ladders, gates = self.ladders(hidden)  # (B, T, ds), (B, T, K, ds), (K,)
        text_mask = mask  # the backbone term pools the text's own tokens, never the prefix
        if prefix is not None:
            s, ladders, mask = with_prefix(prefix, s, ladders, mask)
        self._run = {"s": s, "ladders": ladders, "gates": gates}
        try:
            s = self.side(inputs_embeds=s, attention_mask=mask.long())[0]  # (B, T, ds) after the last block
        finally:
            self._run = {}
        s = self.norm(s)
        if self.pooling == "cls":
            pooled = s[:, 0 if prefix is None else prefix.shape[1]]  # the text's first token
        elif self.pooling == "pair":
            pooled = pair_features(s, mask, segments)
        else:
            pooled = masked_mean(s, mask)  # (B, ds)
        logits = self.head(self.head_dropout(torch.tanh(self.up(pooled))))
        return logits if self.top is None else self.top(logits, hidden, text_mask, segments)


def with_prefix(prefix: torch.Tensor, s: torch.Tensor, ladders: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Side stream, ladders and mask with P prefix positions in front: ladders zero-padded there, mask True."""
    p = prefix.shape[1]
    ladders = torch.cat([ladders.new_zeros(ladders.shape[0], p, *ladders.shape[2:]), ladders], dim=1)
    mask = torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)
    return torch.cat([prefix.to(s.dtype), s], dim=1), ladders, mask
