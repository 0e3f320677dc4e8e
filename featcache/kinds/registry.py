"""The registry of store kinds: one registration per kind pairs its two halves under one name.

    register_kind(ImageExtractKind(), train="sidetrain.kinds.image:TRAIN_KIND")   # featcache/kinds/image/

The extract half (an `ExtractKind`, below) is what the shared writer runs: it is detected from an
extraction request (`matches`, the highest `precedence` wins), plans what it will store without loading
the backbone's weights (`plan`: featcache/plan.py), loads its backbone, computes the rows of a part in
batches (`rows`), and may keep frozen weights that stage 2 needs without the backbone (`frozen_weights`).
Everything else (opening and resuming the store, the shard loop, whole-shard writes, done marks,
finalising, torchrun ranks, error mapping) is the writer's, so every kind gets it for free.

The train half is named by module and attribute and imported on first use (`KindEntry.train()`), so that
stage 1 never imports stage 2 while both halves of a kind are still registered in one place.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BackboneError, DatasetError, StoreError, expected
from ..manifest import kind_of

if TYPE_CHECKING:
    from ..config import ExtractConfig
    from ..plan import KindPlan, RowsFn


class ExtractKind:
    """The stage-1 half of a kind. Subclasses set `name` and `precedence` and fill in the methods."""

    name: str = ""
    # Detection order among the kinds whose `matches` is true: the highest wins. Unique per kind, so the
    # choice never depends on import order (vision-language 30 > seq2seq 20 > image 10 > decoder 5 > encoder 0).
    precedence: int = 0
    free_text_targets: bool = False  # `--task generate` applies: the label column holds each row's target text

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


@dataclass(frozen=True)
class KindEntry:
    """Both halves of one kind, under its name."""

    extract: ExtractKind
    train_ref: str  # "module:attribute" of the stage-2 half (a sidetrain.kinds.base.TrainKind)

    @property
    def name(self) -> str:
        return self.extract.name

    def train(self) -> Any:
        """The stage-2 half, imported now (stage 1 alone never needs it)."""
        module, _, attribute = self.train_ref.partition(":")
        return getattr(importlib.import_module(module), attribute)


_KINDS: dict[str, KindEntry] = {}


def register_kind(kind: ExtractKind, train: str) -> KindEntry:
    """Register a kind: its extract half and where its train half lives ("module:attribute")."""
    if not kind.name or kind.name in _KINDS:
        raise ValueError(f"a store kind needs a new, non-empty name; got {kind.name!r}")
    taken = {e.extract.precedence: e.name for e in _KINDS.values()}
    if kind.precedence in taken:
        raise ValueError(f"store kind {kind.name!r}: precedence {kind.precedence} is {taken[kind.precedence]!r}'s")
    if ":" not in train:
        raise ValueError(f"store kind {kind.name!r}: train must be 'module:attribute', got {train!r}")
    _KINDS[kind.name] = entry = KindEntry(kind, train)
    return entry


def registered_kinds() -> list[str]:
    """Kind names, highest detection precedence first."""
    return [e.name for e in sorted(_KINDS.values(), key=lambda e: -e.extract.precedence)]


def kind_entry(name: str) -> KindEntry:
    if name not in _KINDS:
        raise StoreError(expected(f"a store kind among {registered_kinds()}", repr(name),
                                  "This store was written by a newer lst, or its kind is not installed."))
    return _KINDS[name]


def get_kind(name: str) -> ExtractKind:
    return kind_entry(name).extract


def kind_for_manifest(manifest: dict[str, Any]) -> KindEntry:
    """The kind a store (or a run's recorded store manifest) was written as."""
    return kind_entry(kind_of(manifest))


def kind_for_request(cfg: ExtractConfig, config: Any) -> ExtractKind:
    """The kind that handles this extraction: of those that match, the one of highest precedence."""
    matching = [e.extract for e in _KINDS.values() if e.extract.matches(cfg, config)]
    if matching:
        kind = max(matching, key=lambda k: k.precedence)
        if cfg.task == "generate" and not kind.free_text_targets:
            makers = sorted(e.extract.name for e in _KINDS.values() if e.extract.free_text_targets)
            raise DatasetError(expected(f"--task generate only for a backbone whose kind trains free-text targets "
                                        f"({', '.join(makers)})", f"'{cfg.model}' (a {kind.name} backbone)",
                                        "Use --task classification (T5: --label-text maps labels to words)."))
        return kind
    raise BackboneError(expected(f"a backbone one of the store kinds {registered_kinds()} can extract",
                                 f"'{cfg.model}' ({type(config).__name__ if config is not None else 'no config'})"))


def kind_claiming_name(model: str) -> ExtractKind | None:
    """The kind that knows `model` by name alone (ExtractKind.claims_name), if any."""
    return next((e.extract for e in _KINDS.values() if e.extract.claims_name(model)), None)
