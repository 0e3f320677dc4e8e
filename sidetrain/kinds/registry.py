"""Store kinds as plug-ins: each kind of feature store registers what stage 2 needs from it, by name.

    register_kind("encoder", EncoderKind())      # in sidetrain/kinds/encoder/__init__.py
    kind = kind_for(store.manifest)              # manifest["kind"], or the kind of an older store
    recipe = kind.recipe(cfg, store, device, eval_name)

The name is the one stage 1 writes in `manifest["kind"]`. The training loop, the search and
`lst predict` only ever talk to a `StoreKind`; nothing outside a kind's own package asks which kind a
store is. Importing this module imports `sidetrain.kinds` first, whose `__init__` imports (and so
registers) the built-in kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.errors import StoreError, TrainConfigError, expected
from featcache.kinds import kind_of

if TYPE_CHECKING:
    import torch
    from torch import nn

    from featcache.reader import StoreReader

    from ..config import TrainConfig
    from ..recipe import Recipe


@dataclass(frozen=True)
class SearchFacts:
    """What `lst sweep` needs to build and check a search space for a store of this kind."""

    width: int  # the backbone's hidden width d
    heads: int  # attention heads of a side block
    reduction_factors: tuple[int, ...]  # every r (2..64) that gives a valid side network
    reduction_rule: str  # why those: said when a space asks for another
    blocks: tuple[int, ...]  # stored block layers (hidden_states indices) a --layers choice may name
    stackable: bool  # trials may train K at a time in one vmapped pass (search/stacked.py)


class StoreKind:
    """One kind of store in stage 2. Subclass, fill in the methods, `register_kind(name, instance)`."""

    name: str = ""
    probe: bool = False  # `--head probe` (linear probe on pooled stored states) applies
    generates: bool = False  # `lst predict --generate` applies
    inputs_are_files: bool = False  # `lst predict RUN INPUTS`: each input is one example's file (an image)

    def recipe(self, cfg: TrainConfig, store: StoreReader, device: torch.device, eval_name: str | None) -> Recipe:
        """Side network, batch sources (cached, or the live backbone for --online), loss and predictions."""
        raise NotImplementedError

    def search_facts(self, manifest: dict[str, Any]) -> SearchFacts:
        raise NotImplementedError

    def predict_lines(self, run: Path, config: dict[str, Any], texts: list[str], generate: bool,
                      device: str) -> list[str]:
        """`lst predict`: one label (or generated text) per raw text, from a finished run of this kind
        (`config`: its RUN/config.json). The backbone runs live."""
        raise NotImplementedError

    def stack_member(self, cfg: TrainConfig, store: StoreReader, device: torch.device) -> nn.Module:
        """Stackable kinds: the side network `cfg` trains, initialised as `lst train` would (seeded by
        the caller). It maps a cached batch's (hidden, mask) to logits."""
        raise TrainConfigError(expected("a store kind whose trials can be stacked", self.name, "Use --stack 1."))


_KINDS: dict[str, StoreKind] = {}


def register_kind(name: str, kind: StoreKind) -> None:
    """Make `kind` the stage-2 plug-in for stores whose manifest says `kind: name`."""
    if name in _KINDS and _KINDS[name] is not kind:
        raise ValueError(f"store kind '{name}' is already registered ({type(_KINDS[name]).__name__})")
    kind.name = name
    _KINDS[name] = kind


def kind_names() -> list[str]:
    return sorted(_KINDS)


def kind_for(manifest: dict[str, Any]) -> StoreKind:
    """The registered plug-in for a store (or a run's recorded store manifest); stores written before
    the manifest recorded its kind are told apart by stage 1's rule (featcache.kinds.kind_of)."""
    name = kind_of(manifest)
    if name not in _KINDS:
        raise StoreError(expected(f"a store kind among {kind_names()}", f"'{name}'",
                                  "This store was written by a newer lst, or its kind's plug-in is not installed."))
    return _KINDS[name]
