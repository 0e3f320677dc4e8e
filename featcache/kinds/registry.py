"""The registry of store kinds, and what a kind brings to the shared writer.

A kind is detected from an extraction request (`matches`), plans what it will store without loading
the backbone's weights (`plan`: the parts of every split, with their offsets and layers), loads its
backbone, computes the rows of a part in batches (`rows`), and may keep frozen weights that stage 2
needs without the backbone (`frozen_weights`). Everything else (opening and resuming the store, the
shard loop, whole-shard writes, done marks, finalising, torchrun ranks, error mapping) is the
writer's, so every kind gets it for free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import BackboneError, expected

if TYPE_CHECKING:
    from ..config import ExtractConfig

ROOT = ""  # the part a split's own group holds (its examples); other parts live in sub-groups


@dataclass
class PartPlan:
    """A ragged, token-major array of one split: row i owns tokens offsets[i]:offsets[i+1]."""

    offsets: np.ndarray  # (n_rows + 1,) int64
    layers: list[int]  # stored layer indices (0 = embedding output)
    hidden_size: int
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # written whole beside the states

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])


@dataclass
class KindPlan:
    """What one extraction will store, known before the backbone's weights load."""

    parts: dict[str, dict[str, PartPlan]]  # split -> part name -> plan; ROOT first
    store_dtype: str  # what the kind stores (it may refuse or replace the asked dtype)
    request: dict[str, Any]  # kind-specific options a resume must match
    manifest: dict[str, Any]  # kind-specific manifest fields (backbone, tokenizer, task, ...)
    split_facts: dict[str, dict[str, Any]]  # per split: examples, truncated, rejected rows, labelled, ...
    state: Any = None  # whatever the kind's `rows` needs later (tokenised texts, targets, ...)


RowsFn = Callable[[list[int]], list[torch.Tensor]]  # row indices -> one (len_i, n_layers, d) tensor each


class StoreKind:
    """Base class of a kind; subclasses register an instance with `register_kind`."""

    name: str = ""
    fallback: bool = False  # chosen only when no other kind matches (the generic text encoder)
    precedence: int = 0  # among specific matches the highest wins (vision-language: --image-model decides)

    def matches(self, cfg: ExtractConfig, config: Any) -> bool:
        """Whether this kind handles the request; `config` is the backbone's transformers config or None."""
        raise NotImplementedError

    def claims_name(self, model: str) -> bool:
        """Whether `model` is a name this kind knows without a transformers config (a bundled CNN): the
        writer then looks no config up (no hub request) and passes config=None."""
        return False

    def plan(self, cfg: ExtractConfig, config: Any, backbone: Any | None) -> KindPlan:
        raise NotImplementedError

    def load_backbone(self, cfg: ExtractConfig, device: str) -> Any:
        raise NotImplementedError

    def rows(self, plan: KindPlan, backbone: Any, split: str, part: str) -> RowsFn:
        """Computes the rows of one part of one split (float tensors, before storage encoding)."""
        raise NotImplementedError

    def fidelity(self, cfg: ExtractConfig, plan: KindPlan, backbone: Any) -> dict[str, Any] | None:
        """Measured storage error and precision drift on a sample (the manifest's `fidelity`)."""
        return None

    def frozen_weights(self, backbone: Any) -> dict[str, np.ndarray]:
        """Frozen arrays stage 2 needs without the backbone (stored under `backbone_weights/`)."""
        return {}

    def finish_manifest(self, manifest: dict[str, Any]) -> None:
        """Add kind-specific facts that need the writer's layout (shard counts); in place."""


_KINDS: dict[str, StoreKind] = {}


def register_kind(kind: StoreKind) -> StoreKind:
    if not kind.name or kind.name in _KINDS:
        raise ValueError(f"a store kind needs a new, non-empty name; got {kind.name!r}")
    _KINDS[kind.name] = kind
    return kind


def registered_kinds() -> list[str]:
    return list(_KINDS)


def get_kind(name: str) -> StoreKind:
    if name not in _KINDS:
        raise BackboneError(expected(f"a store kind among {registered_kinds()}", repr(name),
                                     "The store was written by another version of lst."))
    return _KINDS[name]


def kind_for_request(cfg: ExtractConfig, config: Any) -> StoreKind:
    """The kind that handles this extraction: the specific match of highest precedence (the first registered
    on a tie), else the fallback."""
    matching = [k for k in _KINDS.values() if k.matches(cfg, config)]
    specific = sorted((k for k in matching if not k.fallback), key=lambda k: -k.precedence)  # stable
    if specific or matching:
        return (specific or matching)[0]
    raise BackboneError(expected(f"a backbone one of the store kinds {registered_kinds()} can extract",
                                 f"'{cfg.model}' ({type(config).__name__ if config is not None else 'no config'})"))


def kind_claiming_name(model: str) -> StoreKind | None:
    """The kind that knows `model` by name alone (StoreKind.claims_name), if any."""
    return next((k for k in _KINDS.values() if k.claims_name(model)), None)


def kind_of(manifest: dict[str, Any]) -> str:
    """The kind a manifest records (stores written before kinds were recorded: from their fields)."""
    if "kind" in manifest:
        return str(manifest["kind"])
    return "seq2seq" if "seq2seq" in manifest else "encoder"
