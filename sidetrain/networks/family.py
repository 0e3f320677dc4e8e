"""A side network's blocks as the backbone family's own, at 1/r of its width: the backbone's transformers config
with width, feed-forward width and head size divided by r (`side_config`), the r that give a valid network
(`reduction_rule`), and the family's model built from it. Shared by every kind whose side blocks copy a
transformers family (encoder, vision_language; image scales vision configs with the same field names)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import nn

from featcache.errors import TrainConfigError, expected

if TYPE_CHECKING:
    from .side_config import SideConfig

# Config fields that families use for the same quantity (BERT-style first, then DistilBERT-style, ...):
FF_WIDTH_FIELDS = ("intermediate_size", "hidden_dim", "ffn_dim", "d_ff", "encoder_ffn_dim")
HEAD_SIZE_FIELDS = ("head_dim", "attention_head_size")
HIDDEN_DROPOUT_FIELDS = ("hidden_dropout_prob", "dropout")
ATTENTION_DROPOUT_FIELDS = ("attention_probs_dropout_prob", "attention_dropout")


def reduction_rule(backbone_config, num_heads: int | None = None) -> tuple[list[int], str]:
    """Every r in 2..64 that gives a side network (width d/r split into the heads), and why."""
    d = int(backbone_config.hidden_size)
    heads = int(num_heads or backbone_config.num_attention_heads)
    return [r for r in range(2, 65) if d % r == 0 and (d // r) % heads == 0], f"divide width {d} into {heads} heads"


def side_config(backbone_config, side: SideConfig):
    """The backbone config with width, feed-forward width (and head size) divided by r; a block per kept layer."""
    reduction_factor, num_heads = side.reduction_factor, side.num_heads
    d = int(backbone_config.hidden_size)
    heads = int(num_heads or backbone_config.num_attention_heads)
    flag = "--side-heads" if num_heads else "the backbone's head count"

    def good() -> list[int]:
        return reduction_rule(backbone_config, num_heads)[0]

    if d % reduction_factor:
        raise TrainConfigError(expected(f"--reduction-factor dividing the width {d}", reduction_factor,
                                        f"Try --reduction-factor in {good()}."))
    width = d // reduction_factor
    if width % heads:
        divisors = [h for h in range(1, width + 1) if width % h == 0]
        raise TrainConfigError(expected(f"a side width {width} (= {d}/r) divisible by {heads} heads ({flag})",
                                        reduction_factor, f"Try --reduction-factor in {good()}, "
                                        f"or --side-heads in {divisors}."))
    ff_field = next((f for f in FF_WIDTH_FIELDS if isinstance(getattr(backbone_config, f, None), int)), None)
    if ff_field is None:
        raise TrainConfigError(expected(f"a feed-forward width in the backbone config (one of {FF_WIDTH_FIELDS})",
                                        f"a {type(backbone_config).__name__} without any",
                                        "This backbone family is not supported by the encoder side network."))
    cfg = copy.deepcopy(backbone_config)
    cfg.hidden_size = width  # families with other field names map these through config.attribute_map
    cfg.num_attention_heads = heads
    cfg.num_hidden_layers = len(side.kept_layers)
    setattr(cfg, ff_field, max(1, int(getattr(backbone_config, ff_field)) // reduction_factor))
    set_heads_and_dropout(cfg, width, heads, side)
    if hasattr(cfg, "embedding_size"):  # factorised embeddings (ELECTRA): the side model's are never used
        cfg.embedding_size = width
    cfg.vocab_size = 2  # the side model's own embeddings are never used: keep them tiny
    cfg.pad_token_id = 0
    return cfg


def set_heads_and_dropout(cfg, width: int, heads: int, side: SideConfig) -> None:
    """In a scaled copy of a family's config: the head size (families that store it) and the side's dropout
    rates, under whichever field names the family uses."""
    for field in HEAD_SIZE_FIELDS:
        if isinstance(getattr(cfg, field, None), int):
            setattr(cfg, field, width // heads)
    dropouts = ((HIDDEN_DROPOUT_FIELDS, side.dropout), (ATTENTION_DROPOUT_FIELDS, side.attention_dropout))
    for fields, value in dropouts:
        for field in fields:
            if hasattr(cfg, field):
                setattr(cfg, field, value)


def build_side_model(config) -> nn.Module:
    """A transformers model of the backbone's family at the side width (SDPA where the family has it,
    eager otherwise). Its own embeddings and pooler are never used: the embedding ladder replaces them."""
    from transformers import AutoModel

    try:
        model = AutoModel.from_config(config, attn_implementation="sdpa")
    except ValueError:  # "does not support an attention implementation through ... sdpa"
        model = AutoModel.from_config(config, attn_implementation="eager")
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    if not isinstance(getattr(model, "embeddings", None), nn.Module):
        raise TrainConfigError(f"{type(model).__name__} has no `embeddings` module for the embedding ladder to "
                               "replace; this backbone family is not supported by the encoder side network.")
    model.embeddings.requires_grad_(False)
    model.embeddings.forward = skipped  # its output is replaced by the embedding ladder's: do not compute it
    return model


def skipped(*args, **kwargs) -> None:
    return None


def block_list(model: nn.Module, n: int) -> nn.ModuleList:
    """The stack of transformer blocks inside a transformers encoder, found by shape, not by name."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise TrainConfigError(f"Could not find the {n} transformer blocks inside {type(model).__name__}; "
                           "this backbone family is not supported by the encoder side network.")
