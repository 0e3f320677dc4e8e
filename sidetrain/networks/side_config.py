"""The options every kind's side network is built from, resolved once from a run's TrainConfig (`SideConfig`).

A side network takes the backbone's own facts (its config, widths, LM head...) and one SideConfig; it has
no option defaults of its own, so `lst train`, `lst predict` and the tests build the same network from the
same options. The kept layers are resolved here, by the one rule in ladders.py (`kept_blocks`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from featcache.errors import TrainConfigError, expected

from .ladders import kept_blocks

if TYPE_CHECKING:
    from ..config import TrainConfig


@dataclass(frozen=True)
class SideConfig:
    """What a side network reads besides the backbone's facts (one stack of ladders and side blocks)."""

    num_outputs: int  # classes (1: regression) of the head
    stored_layers: list[int]  # hidden_states indices the store holds per token (0: the embedding output)
    kept_layers: list[int]  # stored block layers that feed a ladder and get a side block, in order
    reduction_factor: int  # r: side width = backbone width / r
    dropout: float  # side hidden and head dropout
    attention_dropout: float  # side attention dropout
    pooling: str  # mean, cls or pair: how the side output is pooled for the head (auto resolved)
    num_heads: int | None  # side attention heads; None: the backbone's (or the kind's default)
    top: str  # what the classifier reads: side, last or layers (TrainConfig.top)

    def __post_init__(self) -> None:
        kept_blocks(self.stored_layers, self.kept_layers)  # one built by hand is checked as resolve checks

    @classmethod
    def resolve(cls, cfg: TrainConfig, num_outputs: int, stored: list[int], flag: str = "--layers",
                not_pairs: str | None = "a store of a kind without sentence pairs") -> SideConfig:
        """The run's options for a side network over `stored` layers: --layers resolved (default: every stored
        block) and checked (`flag` names the option in errors). `not_pairs`: what the store is instead of one of
        sentence pairs, which --pooling pair needs (None: it is one); --pooling auto resolves by it."""
        if cfg.pooling == "pair" and not_pairs is not None:
            raise TrainConfigError(expected("--pooling pair only for a store of sentence pairs whose tokenizer "
                                            "marks the two texts (token types)", not_pairs,
                                            "Use --pooling mean."))
        pooling = cfg.pooling
        if pooling == "auto":  # pair pooling where the store holds marked pairs (+1.4 F1 on MRPC), else mean
            pooling = "pair" if not_pairs is None else "mean"
        return cls(num_outputs=num_outputs, stored_layers=list(stored),
                   kept_layers=kept_blocks(stored, cfg.layers, flag), reduction_factor=cfg.reduction_factor,
                   dropout=cfg.dropout, attention_dropout=cfg.attention_dropout, pooling=pooling,
                   num_heads=cfg.side_heads, top=cfg.top)

    def restacked(self, stored: list[int], kept: list[int] | None, flag: str = "--layers") -> SideConfig:
        """The same options over another stack's stored layers (a T5 side decoder), `kept` resolved by the
        same rule (None: every stored block)."""
        return dataclasses.replace(self, stored_layers=list(stored),
                                   kept_layers=kept_blocks(stored, kept, flag))
