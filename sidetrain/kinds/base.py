"""What stage 2 needs from a kind of store (its train half): `TrainKind`, and the facts a search reads.

    kind = kind_for(store.manifest)              # sidetrain/kinds/registry.py
    recipe = kind.recipe(cfg, store, device, eval_name)

The training loop, the search and `lst predict` only ever talk to a `TrainKind`, and read nothing from it
that is not declared here; nothing outside a kind's own folder asks which kind a store is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.errors import TrainConfigError, expected

if TYPE_CHECKING:
    import torch
    from torch import nn

    from featcache.reader import StoreReader

    from ..config import TrainConfig
    from ..pretrained import LadderModel
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


class TrainKind:
    """The stage-2 half of one kind of store. Subclass, fill in the methods, and name an instance in the kind's
    one registration (featcache/kinds/<name>/__init__.py); `name` is set from it."""

    name: str = ""
    probe: bool = False  # `--head probe` (linear probe on pooled stored states) applies
    generates: bool = False  # `lst predict --generate` applies
    inputs_are_files: bool = False  # `lst predict RUN INPUTS`: each input is one example's file (an image)
    needs_images: bool = False  # `lst predict` takes an image per example beside its text (`examples`)

    def recipe(self, cfg: TrainConfig, store: StoreReader, device: torch.device, eval_name: str | None) -> Recipe:
        """Side network, batch sources (cached, or the live backbone for --online), loss and predictions."""
        raise NotImplementedError

    def search_facts(self, manifest: dict[str, Any]) -> SearchFacts:
        raise NotImplementedError

    def load_model(self, folder: Path, config: dict[str, Any], device: torch.device) -> LadderModel:
        """The run (or saved model) in `folder` as one module: its frozen backbone(s), live, and its side network
        (sidetrain/pretrained.py; `config`: its config.json, backbone names resolved). `LadderModel.from_pretrained`
        and `lst predict` both come here."""
        raise NotImplementedError

    def predict_lines(self, run: Path, config: dict[str, Any], texts: list[str], generate: bool,
                      device: str) -> list[str]:
        """`lst predict`: one label (or generated text) per raw text, from a finished run of this kind
        (`config`: its RUN/config.json). The backbone runs live."""
        from featcache.loading import resolve_device

        return self.load_model(Path(run), config, resolve_device(device)).eval().predict_lines(texts, generate)

    def stack_member(self, cfg: TrainConfig, store: StoreReader, device: torch.device) -> nn.Module:
        """Stackable kinds: the side network `cfg` trains, initialised as `lst train` would (seeded by
        the caller). It maps a cached batch's (hidden, mask) to logits."""
        raise TrainConfigError(expected("a store kind whose trials can be stacked", self.name, "Use --stack 1."))

    def fuse_stack(self, members: list[nn.Module]) -> nn.Module | None:
        """Stackable kinds: one network computing K members at once (sidetrain/search/stacked.py), or None when
        the members cannot be fused (the stacked trainer then vmaps them)."""
        return None

    def examples(self, config: dict[str, Any], paths: list[str], texts: list[str], images: list[str]) -> list[str]:
        """Kinds that `needs_images`: the inputs of `lst predict` (rows files, --text, --image) as the lines
        `predict_lines` takes."""
        raise NotImplementedError
