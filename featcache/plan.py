"""What a kind of store tells the shared writer it will store, known before any weights load: the parts
of every split (ragged, token-major arrays with their offsets, layers and columns), and how to compute
their rows. The writer (writer.py) and the layout (layout.py) read nothing else from a kind."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import StoreError, expected

ROOT = ""  # the part a split's own group holds (its examples); other parts live in sub-groups


@dataclass
class PartPlan:
    """A ragged, token-major array of one split: row i owns tokens offsets[i]:offsets[i+1]."""

    offsets: np.ndarray  # (n_rows + 1,) int64
    layers: list[int]  # stored layer indices (0 = embedding output)
    hidden_size: int
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # written whole beside the states
    components: int | None = None  # --components K: the states are stored as K PCA coefficients (compress.py)

    @property
    def width(self) -> int:
        """Values stored per token and layer: d, or K for a compressed store."""
        return self.components or self.hidden_size

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



def check_layers(asked: list[int] | None, n_blocks: int) -> list[int]:
    """--layers (hidden_states indices; None = all of 0..n_blocks) sorted, refused when empty or out of range."""
    layers = list(range(n_blocks + 1)) if asked is None else sorted(set(asked))
    if not layers or layers[0] < 0 or layers[-1] > n_blocks:
        raise StoreError(expected(f"--layers within 0..{n_blocks} (0 = embedding output)",
                                  asked if asked else "no layers"))
    return layers
