"""Compressed stores (`lst extract --components K`): each stored layer kept as its coefficients on a K-dimensional
PCA basis of that layer, fitted on a seeded sample of the training split's tokens.

A ladder reads a backbone state only through W h + b, so a side network trained on h ~= c U^T + mu is the same
model class as one trained on the states projected onto the basis: only what lies outside the basis is lost
(1 - the explained variance). Per part P of the store (ROOT, T5's `dec`, a vision-language store's `images`),
at the store's root:
    compression/<key>/components  (n_layers, d, K) float32   U: orthonormal columns, largest variance first
    compression/<key>/mean        (n_layers, d) float32      mu
    compression/<key>/explained   (n_layers, K) float32      each component's share of the layer's variance
and every split's S/P/hidden holds c = (h - mu) U, (n_tokens, n_layers, K), in the storage dtype (int8 included).
Readers give back h ~= c U^T + mu (featcache/reader.py); the manifest's `compression` records K, the sample,
the seed, the explained variance per layer and a crc32 of each basis.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from .errors import StoreError, expected
from .plan import ROOT, KindPlan, PartPlan, RowsFn
from .progress import progress_bar

COMPRESSION = "compression"  # the root group holding one basis per part
TRAIN_SPLIT = "train"  # the split the basis is fitted on (else the first split)


@dataclass
class Basis:
    """One part's basis: h (..., n_layers, d) <-> coefficients c (..., n_layers, K)."""

    components: torch.Tensor  # (n_layers, d, K) float32
    mean: torch.Tensor  # (n_layers, d) float32
    explained: np.ndarray  # (n_layers, K) share of each layer's variance per component (on the fit sample)

    @property
    def k(self) -> int:
        return int(self.components.shape[-1])

    def select(self, positions: list[int]) -> Basis:
        """The basis of some stored layers (positions in the part's layer axis)."""
        if positions == list(range(self.components.shape[0])):
            return self
        return Basis(self.components[positions], self.mean[positions], self.explained[positions])

    def to(self, device: torch.device | str) -> Basis:
        return Basis(self.components.to(device), self.mean.to(device), self.explained)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., n_layers, d) states -> (..., n_layers, K) float32 coefficients."""
        return torch.einsum("...ld,ldk->...lk", hidden.float() - self.mean, self.components)

    def reconstruct(self, coefficients: torch.Tensor) -> torch.Tensor:
        """(..., n_layers, K) coefficients -> (..., n_layers, d) float32 states on the basis."""
        return torch.einsum("...lk,ldk->...ld", coefficients.float(), self.components) + self.mean

    def roundtrip(self, hidden: torch.Tensor) -> torch.Tensor:
        """What a float32 store gives back for these states: their projection onto the basis."""
        return self.reconstruct(self.project(hidden))


def group_key(part: str) -> str:
    return "root" if part == ROOT else part


def fit_split(plan: KindPlan) -> str:
    return TRAIN_SPLIT if TRAIN_SPLIT in plan.parts else next(iter(plan.parts))


def apply_components(plan: KindPlan, components: int | None, sample_tokens: int) -> None:
    """Give every part of every split K stored columns, refusing a K the parts or the sample cannot hold."""
    if components is None:
        return
    fit = fit_split(plan)
    for name, part in plan.parts[fit].items():
        where = f"part '{name}'" if name else "the stored states"
        if components > part.hidden_size:
            raise StoreError(expected(f"--components at most the width d = {part.hidden_size} of {where}",
                                      components, "Pick a smaller K (d/4 keeps ~4x fewer bytes)."))
        available = min(sample_tokens, part.n_tokens)
        if components > available:
            raise StoreError(expected(f"--components at most the {available:,} tokens the basis of {where} is "
                                      f"fitted on (split '{fit}', --components-sample {sample_tokens:,})",
                                      components, "Pick a smaller K, or fit on more tokens."))
    for parts in plan.parts.values():
        for part in parts.values():
            part.components = components


def sample_rows(part: PartPlan, sample_tokens: int, seed: int) -> tuple[list[int], int]:
    """Seeded rows of a part whose tokens make the fit sample, and how many tokens it takes (the last row may
    be cut short)."""
    order = np.random.default_rng(seed).permutation(part.n_rows)
    total = np.cumsum(part.lengths[order])
    n = int(np.searchsorted(total, sample_tokens, side="left")) + 1  # rows up to the one that reaches the sample
    picks = order[:n][np.argsort(part.lengths[order[:n]], kind="stable")]  # length-sorted: little padding
    return picks.tolist(), int(min(sample_tokens, part.n_tokens))


def fit_basis(rows: RowsFn, part: PartPlan, components: int, sample_tokens: int, seed: int, batch_size: int,
              advance: Callable[[int], None] = lambda n: None) -> tuple[Basis, int]:
    """PCA of each layer over a seeded sample of the part's tokens: float64 moments, then torch.linalg.eigh.
    Returns (basis, tokens fitted on). The same (rows, seed, sample) always gives the same basis."""
    picks, want = sample_rows(part, sample_tokens, seed)
    n_layers, d = len(part.layers), part.hidden_size
    total = torch.zeros(n_layers, d, dtype=torch.float64)
    outer = torch.zeros(n_layers, d, d, dtype=torch.float64)
    seen = 0
    for b in range(0, len(picks), batch_size):
        for states in rows(picks[b:b + batch_size]):  # (len_i, n_layers, d)
            x = states[:want - seen].double().cpu()
            total += x.sum(0)
            outer += torch.einsum("nld,nle->lde", x, x)
            seen += len(x)
            advance(len(x))
    mean = total / seen
    cov = outer / seen - mean[:, :, None] * mean[:, None, :]  # (L, d, d)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values, vectors = values.flip(-1).clamp_min(0), vectors.flip(-1)[..., :components]
    # eigh's signs are arbitrary: make each column's largest entry positive so a refit stores the same basis
    peak = vectors.abs().argmax(dim=1, keepdim=True)
    vectors = vectors * torch.sign(torch.gather(vectors, 1, peak))
    share = values[:, :components] / values.sum(-1, keepdim=True).clamp_min(1e-30)
    return Basis(vectors.float().contiguous(), mean.float(), share.float().numpy()), seen


def basis_crc(basis: Basis) -> int:
    crc = zlib.crc32(basis.components.numpy().tobytes())
    crc = zlib.crc32(basis.mean.numpy().tobytes(), crc)
    return zlib.crc32(np.ascontiguousarray(basis.explained, dtype=np.float32).tobytes(), crc)


def write_basis(root: zarr.Group, part: str, basis: Basis) -> int:
    """Store one part's basis (whole arrays, atomic files) and return its crc32 for the manifest."""
    g = root.require_group(f"{COMPRESSION}/{group_key(part)}")
    g.create_array("components", data=basis.components.numpy(), overwrite=True)
    g.create_array("mean", data=basis.mean.numpy(), overwrite=True)
    g.create_array("explained", data=np.asarray(basis.explained, dtype=np.float32), overwrite=True)
    return basis_crc(basis)


def basis_problem(root: zarr.Group, part: str, record: dict[str, Any]) -> str | None:
    """Why a stored basis cannot be trusted (missing, unreadable, checksum mismatch), or None."""
    try:
        basis = load_basis(root, part)
    except Exception as err:  # noqa: BLE001 - zarr raises several types for missing or torn arrays
        return f"unreadable ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})"
    return None if basis_crc(basis) == int(record["crc"]) else "checksum mismatch (its bytes changed)"


def load_basis(root: zarr.Group, part: str) -> Basis:
    g = root[f"{COMPRESSION}/{group_key(part)}"]
    return Basis(torch.from_numpy(np.ascontiguousarray(g["components"][:])),
                 torch.from_numpy(np.ascontiguousarray(g["mean"][:])), np.asarray(g["explained"][:]))


def read_bases(root: zarr.Group, record: dict[str, Any] | None, where: str) -> dict[str, Basis]:
    """Every part's basis of a compressed store, checked against its recorded crc; {} for a full store."""
    if not record:
        return {}
    bases = {}
    for part, facts in record["parts"].items():
        problem = basis_problem(root, part, facts)
        if problem is not None:
            raise StoreError(f"The PCA basis of part '{group_key(part)}' in '{where}' is damaged: {problem}. "
                             "Re-running the same `lst extract` refits it and recomputes the shards.")
        bases[part] = load_basis(root, part)
    return bases


def compression_request(components: int | None, sample_tokens: int, seed: int) -> dict[str, Any]:
    """What a resume must match: components None for a full store (what older stores' requests read as)."""
    if components is None:
        return {"components": None}
    return {"components": components, "components_sample": sample_tokens, "components_seed": seed}


def fit_and_store(root: zarr.Group, plan: KindPlan, rows_for: Callable[[str, str], RowsFn], components: int,
                  sample_tokens: int, seed: int, batch_size: int, show: bool = True) -> dict[str, Any]:
    """Fit every part's basis on the training split and write it; returns the manifest's `compression`."""
    split = fit_split(plan)
    parts = plan.parts[split]
    record: dict[str, Any] = {"method": "pca", "components": components, "sample_tokens": sample_tokens,
                              "seed": seed, "fit_split": split, "parts": {}}
    todo = sum(min(sample_tokens, p.n_tokens) for p in parts.values())
    with progress_bar("fit basis", todo, unit="tok", disable=not show) as bar:
        for name, part in parts.items():
            basis, seen = fit_basis(rows_for(split, name), part, components, sample_tokens, seed, batch_size,
                                    bar.advance)
            crc = write_basis(root, name, basis)
            kept = basis.explained.sum(-1)
            record["parts"][name] = {"hidden_size": part.hidden_size, "components": components, "fitted_tokens": seen,
                                     "explained_variance": [round(float(v), 6) for v in kept],
                                     "path": f"{COMPRESSION}/{group_key(name)}", "crc": crc}
    return record


def projecting(rows: RowsFn, basis: Basis) -> RowsFn:
    """Rows as a compressed store keeps them: each state's coefficients on the part's basis."""
    return lambda items: [basis.project(states) for states in rows(items)]
