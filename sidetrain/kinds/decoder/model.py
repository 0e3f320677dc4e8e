"""The LST side network over a decoder-only backbone's stored states (QST / Ladder-Up style, docs/design.md 1c).

    s = W_emb e + b_emb                                   # embedding ladder, d -> d/r  (networks/ladders.py)
    for j, i in enumerate(K):                             # kept backbone layers
        mu = sigmoid(alpha_j / T)
        s = mu * s + (1 - mu) * (W_j h_i + b_j)           # ladder j, d -> d/r
        s = DecoderBlock_j(s, causal mask, positions)     # a block of the backbone's own family at width d/r
    z = FinalNorm(s)[last real token]                     # the family's final norm, at width d/r
    out = Head(dropout(tanh(W_up z)))                     # d/r -> d -> outputs
    out = (1 - g) out + g W LayerNorm(h_last[last token]) # --top last|layers (networks/top.py, QST's gate)

The side blocks are the family's own transformers base model (LlamaModel, Qwen2Model, MistralModel, GPT2Model, ...)
built from a copy of the backbone's config scaled by 1/r and fed `inputs_embeds`, so the causal mask, rotary or
learned positions, grouped-query attention and sliding windows are whatever the family's blocks do. Hooks mix
the ladders in before each block.
"""

from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING

import torch
from torch import nn

from featcache.errors import TrainConfigError, expected
from featcache.kinds.decoder.backbone import cache_argument

from ...networks.family import FF_WIDTH_FIELDS, block_list, set_heads_and_dropout
from ...networks.ladders import Ladders, mix
from ...networks.top import backbone_top

if TYPE_CHECKING:
    from ...networks.side_config import SideConfig

GPT2_DROPOUTS = (("resid_pdrop", "dropout"), ("embd_pdrop", "dropout"), ("attn_pdrop", "attention_dropout"))


def rotary(config) -> bool:
    """Whether the family rotates query and key pairs (then a head's size must be even)."""
    return any(getattr(config, f, None) is not None for f in ("rope_theta", "rope_parameters", "rope_scaling"))


def decoder_reduction_rule(config, num_heads: int | None = None) -> tuple[list[int], str]:
    """Every r in 2..64 that gives a causal side network: d/r split into the heads (and the grouped key/value
    heads), each head even-sized where the family is rotary."""
    d = int(config.hidden_size)
    heads = int(num_heads or config.num_attention_heads)
    kv = side_kv_heads(config, heads)
    even = rotary(config)
    good = [r for r in range(2, 65) if d % r == 0 and (d // r) % heads == 0 and heads % kv == 0
            and (not even or (d // r // heads) % 2 == 0)]
    return good, f"divide width {d} into {heads} heads" + (" of even size (rotary positions)" if even else "")


def side_kv_heads(config, heads: int) -> int:
    """The side's key/value heads: the backbone's grouping kept where it divides the side's heads, else none."""
    kv = getattr(config, "num_key_value_heads", None)
    return int(kv) if isinstance(kv, int) and heads % int(kv) == 0 else heads


def causal_side_config(backbone_config, side: SideConfig):
    """The backbone config with width, feed-forward width and head size divided by r; one block per kept layer,
    each of the attention type (full or sliding) of the backbone block it sits beside."""
    r, d = side.reduction_factor, int(backbone_config.hidden_size)
    heads = int(side.num_heads or backbone_config.num_attention_heads)
    good, rule = decoder_reduction_rule(backbone_config, side.num_heads)
    if r not in good:
        raise TrainConfigError(expected(f"--reduction-factor that can {rule}", r,
                                        f"Try --reduction-factor in {good or 'none: use --side-heads'}."))
    width = d // r
    cfg = copy.deepcopy(backbone_config)
    cfg.hidden_size = width  # GPT-2's n_embd through its attribute_map
    cfg.num_attention_heads = heads
    if isinstance(getattr(cfg, "num_key_value_heads", None), int):
        cfg.num_key_value_heads = side_kv_heads(backbone_config, heads)
    cfg.num_hidden_layers = len(side.kept_layers)
    ff = next((f for f in (*FF_WIDTH_FIELDS, "n_inner") if isinstance(getattr(backbone_config, f, None), int)), None)
    if ff is not None:  # GPT-2 without n_inner: 4 x width by itself
        setattr(cfg, ff, max(1, int(getattr(backbone_config, ff)) // r))
    set_heads_and_dropout(cfg, width, heads, side)
    for field, option in GPT2_DROPOUTS:
        if hasattr(cfg, field):
            setattr(cfg, field, getattr(side, option))
    if isinstance(getattr(backbone_config, "layer_types", None), list):
        cfg.layer_types = [backbone_config.layer_types[k - 1] for k in side.kept_layers]
    cfg.vocab_size = 2  # the side model's token embeddings are never used: inputs_embeds come from the ladder
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, None, None
    cfg.use_cache = False
    return cfg


def build_causal_model(config) -> nn.Module:
    """The family's base model at the side width (SDPA where the family has it); token embeddings frozen, unused."""
    from transformers import AutoModel

    try:
        model = AutoModel.from_config(config, attn_implementation="sdpa")
    except ValueError:
        model = AutoModel.from_config(config, attn_implementation="eager")
    model.get_input_embeddings().requires_grad_(False)
    return model


def last_token(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, right-padded -> (B,) index of each row's last real token."""
    return (mask.long().sum(1) - 1).clamp(min=0)


class CausalSideStack(nn.Module):
    """Ladders and the family's blocks at 1/r width: backbone states (B, T, n_stored, d) -> side states (B, T, d/r)
    after the family's final norm. The classification network (`CausalSideNetwork`) and the LM-head network
    (lm_model.py) put their tops on it. `side`: the run's options, kept layers resolved (SideConfig.resolve)."""

    def __init__(self, backbone_config, side: SideConfig) -> None:
        super().__init__()
        self.config = causal_side_config(backbone_config, side)
        d, ds = int(backbone_config.hidden_size), int(self.config.hidden_size)
        self.kept_layers = list(side.kept_layers)
        self.ladders = Ladders(d, ds, side.stored_layers, self.kept_layers)
        self.side = build_causal_model(self.config)
        self.__dict__["blocks"] = block_list(self.side, len(self.kept_layers))  # a view, not a registration
        for j, block in enumerate(self.blocks):  # bound methods: a deep copy calls its own hooks
            block.register_forward_pre_hook(functools.partial(self._mix_ladder, j), with_kwargs=True)
        self._run: dict[str, torch.Tensor] = {}

    def _mix_ladder(self, j: int, module, args, kwargs):
        """Block j's input s -> mu_j * s + (1 - mu_j) * ladder_j."""
        ladders, gates = self._run["ladders"], self._run["gates"]
        if args:
            return (mix(args[0], ladders, gates, j), *args[1:]), kwargs
        kwargs["hidden_states"] = mix(kwargs["hidden_states"], ladders, gates, j)
        return args, kwargs

    def side_states(self, hidden: torch.Tensor, mask: torch.Tensor, cache=None) -> torch.Tensor:
        """hidden (B, T, n_stored, d), mask (B, T) bool -> (B, T, ds). With `cache` (generation: one unpadded row),
        `hidden` holds the new positions only, `mask` every position so far, and the family's own KV cache (a
        transformers Cache, filled in place) holds the side blocks' keys and values of the earlier ones."""
        s, ladders, gates = self.ladders(hidden)  # (B, T, ds), (B, T, K, ds), (K,)
        self._run = {"ladders": ladders, "gates": gates}
        try:
            return self.side(inputs_embeds=s, attention_mask=mask.long(), use_cache=cache is not None,
                             **cache_argument(self.side, cache)).last_hidden_state
        finally:
            self._run = {}

    def new_cache(self):
        """An empty KV cache of the side model's family (its sliding layers kept as the family keeps them)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.config)


class CausalSideNetwork(CausalSideStack):
    """Classification or regression from the last real token (the module docstring's `out`)."""

    def __init__(self, backbone_config, side: SideConfig) -> None:
        super().__init__(backbone_config, side)
        d, ds = int(backbone_config.hidden_size), int(self.config.hidden_size)
        self.up = nn.Linear(ds, d)
        self.head_dropout = nn.Dropout(side.dropout)
        self.head = nn.Linear(d, side.num_outputs)
        self.top = backbone_top(d, len(side.stored_layers), side.num_outputs, side.top, side.dropout,
                                norm_eps(backbone_config))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, n_stored, d) backbone states, right-padded; mask (B, T) bool -> (B, num_outputs)."""
        out = self.side_states(hidden, mask)
        last = last_token(mask)  # (B,)
        rows = torch.arange(len(last), device=last.device)
        logits = self.head(self.head_dropout(torch.tanh(self.up(out[rows, last]))))
        if self.top is None:
            return logits
        at_last = torch.zeros_like(mask, dtype=torch.bool)
        at_last[rows, last] = True  # the backbone term reads the last real token's state alone
        return self.top(logits, hidden, at_last)


def norm_eps(backbone_config) -> float:
    """The backbone's norm epsilon (the --top term's LayerNorm uses it)."""
    return next((float(v) for f in ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps")
                 if isinstance(v := getattr(backbone_config, f, None), float)), 1e-5)
