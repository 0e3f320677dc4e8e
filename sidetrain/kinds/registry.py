"""Finding a store's train half: the kind its manifest records, looked up in the one registry of kinds
(featcache/kinds/registry.py), whose entries name their train half (sidetrain/kinds/<name>/TRAIN_KIND)."""

from __future__ import annotations

from typing import Any

from featcache.kinds import kind_entry, kind_for_manifest, registered_kinds

from .base import TrainKind


def kind_for(manifest: dict[str, Any]) -> TrainKind:
    """The train half of a store's kind (or of a run's recorded store manifest)."""
    return train_half(kind_for_manifest(manifest).name)


def train_half(name: str) -> TrainKind:
    entry = kind_entry(name)
    kind = entry.train()
    if not isinstance(kind, TrainKind):
        raise TypeError(f"store kind {name!r}: {entry.train_ref} is a {type(kind).__name__}, not a TrainKind")
    kind.name = name
    return kind


def kind_names() -> list[str]:
    return sorted(registered_kinds())
