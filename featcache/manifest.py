"""Reading a store's manifest the same way everywhere: stores written before the manifest recorded their
kind and their parts (format 1, early) are normalised here, once, from their older fields (`seq2seq`,
`decoder_bytes_per_token`, per-split `decoder_shards`)."""

from __future__ import annotations

from typing import Any

from .plan import ROOT

LEGACY_DECODER = "dec"  # the decoder part of T5 stores written before parts were recorded


def kind_of(manifest: dict[str, Any]) -> str:
    """The kind a manifest records; older stores: "seq2seq" if they carry T5 fields, else "encoder"."""
    if "kind" in manifest:
        return str(manifest["kind"])
    return "seq2seq" if "seq2seq" in manifest else "encoder"


def _root_first(parts: dict[str, Any]) -> dict[str, Any]:
    return {p: parts[p] for p in sorted(parts, key=lambda p: (p != ROOT, p))}


def store_parts(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Part name -> {layers, bytes_per_token, ...}, the root part first."""
    parts = dict(manifest.get("parts") or {})
    if not parts:
        parts[ROOT] = {"layers": manifest.get("layers"), "bytes_per_token": manifest.get("bytes_per_token")}
        if "seq2seq" in manifest:
            parts[LEGACY_DECODER] = {"layers": manifest["seq2seq"].get("decoder_layers"),
                                     "bytes_per_token": manifest.get("decoder_bytes_per_token")}
    return _root_first(parts)


def split_parts(facts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Part name -> {rows, tokens, shards} of one split (a manifest's `splits[name]`)."""
    parts = dict(facts.get("parts") or {})
    if not parts:
        parts[ROOT] = {"rows": facts.get("examples"), "tokens": facts.get("tokens"), "shards": facts.get("shards", 0)}
        if "decoder_shards" in facts:
            parts[LEGACY_DECODER] = {"rows": facts.get("decoder_rows"), "tokens": facts.get("decoder_tokens"),
                                     "shards": facts["decoder_shards"]}
    return _root_first(parts)


def part_layers(manifest: dict[str, Any], part: str) -> list[int] | None:
    """Stored layers of a split's part ('' = the split's own); None if the store has no such part."""
    if part == ROOT:
        return manifest["layers"]
    return store_parts(manifest).get(part, {}).get("layers")


def compression_of(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """A compressed store's record (K, sample, seed, per-part explained variance and basis checksums); None for
    a store of full states, which every store written before `--components` existed is."""
    return manifest.get("compression") or None


def part_components(manifest: dict[str, Any], part: str) -> int | None:
    """K coefficients stored per token and layer of a part, or None where it holds the full states."""
    record = compression_of(manifest)
    return None if record is None or part not in record["parts"] else int(record["parts"][part]["components"])
