"""`lst inspect`: what a store holds, where it came from, how big and how complete it is.

Works on incomplete stores too (a crashed or running extraction), since "how far did it get" is one
of the questions a user asks. Sizes are measured from the stored objects, not from the manifest.

Generic over the store's kind: every split has parts (ragged, token-major, sharded arrays; "" is the
split's own group, "dec" is S/dec in seq2seq stores), listed by the manifest's `parts` and
`splits[S]["parts"]`. A part is complete when every flag of `S/<part>/shard_done` is set. Stores
written before kinds and parts were recorded get both from their older fields (`seq2seq`,
`decoder_shards`, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zarr

from . import store as S
from .destination import local_path, zarr_location
from .errors import StoreError, expected
from .manifest import compression_of, kind_of, split_parts, store_parts
from .plan import ROOT
from .verify import verify_group

# The writer measures, on a sample, the error of each storage dtype and of the compute precision
# against fp32, under the manifest key `fidelity`; other top-level keys naming an error are shown too.
FIDELITY_KEY = "fidelity"
ERROR_KEY_WORDS = ("error", "drift")


def open_manifest(path: str | Path) -> tuple[zarr.Group, dict[str, Any]]:
    """The store's group and manifest; clear errors for a missing path or something that is not a store."""
    where = str(path)
    local = local_path(where)  # a plain path or a file:// URL
    if local is not None and not local.exists():
        raise StoreError(expected("an existing feature store", f"'{where}' (no such path)",
                                  "Check the path, or create a store with `lst extract`."))
    try:
        group = zarr.open_group(zarr_location(where), mode="r")
    except Exception as err:  # noqa: BLE001 - zarr raises several types for "not a group"
        raise StoreError(expected("a Zarr v3 feature store written by `lst extract`",
                                  f"'{where}', which is not a Zarr group ({type(err).__name__})",
                                  "Point at the folder `lst extract --out` wrote.")) from None
    return group, S.check_manifest(group.attrs.get(S.MANIFEST_KEY), where,
                                 bare=not dict(group.attrs) and not list(group.keys()))


def _stored_bytes(group: zarr.Group) -> int:
    """Bytes of all stored chunks under a group (works for local and fsspec stores)."""
    total = 0
    for _, node in group.members(max_depth=None):
        if isinstance(node, zarr.Array):
            total += int(node.nbytes_stored())
    return total


def measured_errors(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's measured errors: `fidelity`, plus any top-level key naming an error or a drift."""
    found = {k: v for k, v in manifest.items() if any(w in k.lower() for w in ERROR_KEY_WORDS)}
    if manifest.get(FIDELITY_KEY) is not None:
        found[FIDELITY_KEY] = manifest[FIDELITY_KEY]
    return found


def _error_rows(errors: dict[str, Any], store_dtype: str | None) -> list[tuple[str, str]]:
    """Readable rows: the stored dtype's error first, then the others, then the compute drift."""
    rows: list[tuple[str, str]] = []
    fidelity = errors.get(FIDELITY_KEY) or {}
    per_dtype = fidelity.get("storage_error") or {}
    order = sorted(per_dtype, key=lambda k: k != store_dtype)
    for dtype in order:
        e = per_dtype[dtype]
        mark = " (this store)" if dtype == store_dtype else ""
        rows.append((f"storage error {dtype}{mark}", _error_text(e)))
    for key in ("precision_drift", "total_error"):
        if fidelity.get(key):
            rows.append((key.replace("_", " ") + f" ({fidelity.get('precision')})", _error_text(fidelity[key])))
    if fidelity:
        rows.append(("error sample", f"{fidelity.get('examples', '?')} examples, {fidelity.get('tokens', '?')} tokens"))
    for key, value in errors.items():
        if key != FIDELITY_KEY:
            rows.append((key.replace("_", " "), _compact(value)))
    return rows


def _error_text(e: Any) -> str:
    if not isinstance(e, dict) or "rel_error" not in e:
        return _compact(e)
    return (f"relative {e['rel_error']:.3g}, cosine mean {e.get('cosine_mean', float('nan')):.6f} "
            f"min {e.get('cosine_min', float('nan')):.6f}")


def _part_state(split_group: zarr.Group | None, part: str, facts: dict[str, Any]) -> dict[str, Any]:
    total = int(facts.get("shards") or 0)
    entry = {"rows": facts.get("rows"), "tokens": facts.get("tokens"), "shards_total": total, "shards_done": 0,
             "bytes_on_disk": 0}
    node = None
    if split_group is not None:
        node = split_group if part == ROOT else split_group.get(part)
    if isinstance(node, zarr.Group):
        if total and "shard_done" in node:
            # an empty part has one placeholder flag and nothing to write
            entry["shards_done"] = min(int(node["shard_done"][:total].sum()), total)
        if part != ROOT:
            entry["bytes_on_disk"] = _stored_bytes(node)
    entry["complete"] = entry["shards_done"] >= total
    return entry


def inspect_store(path: str | Path) -> dict[str, Any]:
    """Everything `lst inspect` shows, as a JSON-serialisable dict."""
    group, manifest = open_manifest(path)
    layers = manifest.get("layers", [])
    d = manifest.get("hidden_size")
    kind_parts = store_parts(manifest)
    splits: dict[str, Any] = {}
    for name, facts in manifest.get("splits", {}).items():
        entry = {k: facts.get(k) for k in ("examples", "tokens", "truncated", "rejected_rows", "labelled")}
        g = group.get(name)
        g = g if isinstance(g, zarr.Group) else None
        parts = {p: _part_state(g, p, f) for p, f in split_parts(facts).items()}
        entry["shards_total"] = sum(p["shards_total"] for p in parts.values())
        entry["shards_done"] = sum(p["shards_done"] for p in parts.values())
        entry["bytes_on_disk"] = _stored_bytes(g) if g is not None else 0
        if ROOT in parts:  # the split's own arrays: everything in its group but the other parts
            parts[ROOT]["bytes_on_disk"] = entry["bytes_on_disk"] - sum(
                p["bytes_on_disk"] for n, p in parts.items() if n != ROOT)
        entry["complete"] = entry["shards_done"] >= entry["shards_total"]
        entry["parts"] = parts
        splits[name] = entry
    tokens = sum(int(s["tokens"] or 0) for s in splits.values())
    on_disk = _stored_bytes(group)
    # bytes outside the splits, e.g. the frozen weights a seq2seq store keeps in backbone_weights/
    others = {n: _stored_bytes(node) for n, node in group.members()
              if n not in splits and isinstance(node, zarr.Group)}
    part_summary: dict[str, Any] = {}
    for p, facts in kind_parts.items():
        states = [s["parts"][p] for s in splits.values() if p in s["parts"]]
        p_tokens = sum(int(s["tokens"] or 0) for s in states)
        p_bytes = sum(s["bytes_on_disk"] for s in states)
        part_summary[p] = {"layers": facts.get("layers"), "bytes_per_token": facts.get("bytes_per_token"),
                           "rows": sum(int(s["rows"] or 0) for s in states), "tokens": p_tokens,
                           "bytes_on_disk": p_bytes, "bytes_per_token_on_disk": p_bytes / p_tokens if p_tokens else None,
                           "shards_done": sum(s["shards_done"] for s in states),
                           "shards_total": sum(s["shards_total"] for s in states)}
    root_part = part_summary.get(ROOT, {})
    backbone = manifest.get("backbone", {})
    dataset = manifest.get("dataset", {})
    return {
        "path": str(path),
        "format_version": manifest.get("format_version"),
        "kind": kind_of(manifest),
        "complete": bool(manifest.get("complete")),
        "shards_done": sum(s["shards_done"] for s in splits.values()),
        "shards_total": sum(s["shards_total"] for s in splits.values()),
        "splits": splits,
        "parts": part_summary,
        "examples": sum(int(s["examples"] or 0) for s in splits.values()),
        "tokens": tokens,
        "layers": layers,
        "hidden_size": d,
        "store_dtype": manifest.get("store_dtype"),
        "precision": manifest.get("precision"),
        "max_length": manifest.get("max_length"),
        "bytes_on_disk": on_disk,
        "bytes_outside_splits": others,
        "bytes_per_token": manifest.get("bytes_per_token"),
        # the examples' own arrays per example token (other parts and frozen weights are counted apart)
        "bytes_per_token_on_disk": root_part.get("bytes_per_token_on_disk"),
        "backbone": {"name": backbone.get("name"), "revision": backbone.get("revision"),
                     "model_type": backbone.get("model_type"), "num_layers": backbone.get("num_layers")},
        "tokenizer": manifest.get("tokenizer", {}).get("name"),
        "dataset": {"source": dataset.get("source"), "fingerprint": dataset.get("fingerprint"),
                    "columns": dataset.get("columns")},
        "task": manifest.get("task"),
        "measured_error": measured_errors(manifest),
        "compression": compression_summary(manifest, part_summary),
        "versions": manifest.get("versions"),
    }


def compression_summary(manifest: dict[str, Any], parts: dict[str, Any]) -> dict[str, Any] | None:
    """A compressed store's K, fit sample and per-layer explained variance, with each part's bytes against what
    the full states would take in the same dtype; None for a store of full states."""
    record = compression_of(manifest)
    if record is None:
        return None
    out = {k: record.get(k) for k in ("method", "components", "sample_tokens", "seed", "fit_split")}
    out["parts"] = {}
    for p, facts in record["parts"].items():
        layers = len(parts.get(p, {}).get("layers") or [])
        full = S.bytes_per_token(manifest["store_dtype"], layers, int(facts["hidden_size"]))
        stored = parts.get(p, {}).get("bytes_per_token")
        out["parts"][p] = {**{k: facts.get(k) for k in ("components", "hidden_size", "fitted_tokens",
                                                        "explained_variance")},
                           "bytes_per_token": stored, "full_bytes_per_token": full,
                           "ratio": full / stored if stored else None}
    return out


def _compression_rows(info: dict[str, Any] | None) -> list[tuple[str, str]]:
    if info is None:
        return []
    rows = []
    for p, c in info["parts"].items():
        name = f"{p} " if p else ""
        what = (f"{info['method']}: K={c['components']} of d={c['hidden_size']}, fitted on {c['fitted_tokens']:,} "
                f"{info['fit_split']} tokens (seed {info['seed']}); {c['bytes_per_token']:,} bytes/token vs "
                f"{c['full_bytes_per_token']:,} full ({c['ratio']:.1f}x smaller)")
        rows.append((f"{name}compression", what))
        rows.append((f"{name}explained variance", _compact(c["explained_variance"]) + " per layer (on the fit sample; "
                     "the rows below measure the storage dtype on the full states)"))
    return rows


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _per_token(manifest_value: Any, on_disk: float | None) -> str:
    listed = f"{manifest_value:,}" if isinstance(manifest_value, int) else str(manifest_value)
    return f"{listed} in the manifest; " + (f"{on_disk:,.1f} on disk" if on_disk else "- on disk")


def _compact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_compact(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_compact(v) for v in value) + "]"
    return str(value)


def render(info: dict[str, Any]):
    """A rich renderable of `inspect_store`'s dict: facts, then one row per split."""
    from rich.console import Group
    from rich.table import Table

    facts = Table(title=f"lst store {info['path']}", show_header=False)
    facts.add_column("", style="bold")
    facts.add_column("")
    state = "complete" if info["complete"] else "INCOMPLETE (re-run the same `lst extract` to resume)"
    rows = [
        ("status", f"{state}; shards {info['shards_done']}/{info['shards_total']} done"),
        ("kind", str(info["kind"])),
        ("backbone", (f"{info['backbone']['name']} ({info['backbone']['model_type']}, "
                      f"{info['backbone']['num_layers']} blocks)")),
        ("backbone revision", str(info["backbone"]["revision"])),
        ("dataset", str(info["dataset"]["source"])),
        ("dataset fingerprint", str(info["dataset"]["fingerprint"])),
        ("layers", _compact(info["layers"]) + f" (d={info['hidden_size']})"),
    ]
    for part, p in info["parts"].items():
        if part:
            rows.append((f"{part} layers", _compact(p["layers"])))
    rows += [
        ("dtype", f"store {info['store_dtype']}, compute {info['precision']}, max length {info['max_length']}"),
        ("examples / tokens", f"{info['examples']:,} / {info['tokens']:,}"),
        ("size on disk", _size(info["bytes_on_disk"])),
        ("bytes per token", _per_token(info["bytes_per_token"], info["bytes_per_token_on_disk"])),
    ]
    for part, p in info["parts"].items():
        if part:
            rows.append((f"{part} rows / tokens", f"{p['rows']:,} / {p['tokens']:,}"))
            rows.append((f"{part} bytes per token", _per_token(p["bytes_per_token"], p["bytes_per_token_on_disk"])))
    for name, n in info["bytes_outside_splits"].items():
        rows.append((f"{name} on disk", _size(n)))
    rows += _compression_rows(info.get("compression"))
    rows += _error_rows(info["measured_error"], info["store_dtype"]) or [("measured error", "not in the manifest")]
    for k, v in rows:
        facts.add_row(k, v)
    splits = Table(title="splits")
    for col in ("split", "examples", "tokens", "truncated", "labelled", "shards", "on disk"):
        splits.add_column(col, justify="left" if col == "split" else "right")
    for name, s in info["splits"].items():
        splits.add_row(name, f"{s['examples']:,}", f"{s['tokens']:,}", f"{s['truncated'] or 0:,}",
                       "yes" if s["labelled"] else "no", f"{s['shards_done']}/{s['shards_total']}",
                       _size(s["bytes_on_disk"]))
        for part, p in s["parts"].items():
            if part:  # a further part of the split: its rows, tokens, shards and bytes (counted in the split's)
                splits.add_row(f"  {part}", f"{p['rows'] or 0:,} rows", f"{p['tokens'] or 0:,}", "", "",
                               f"{p['shards_done']}/{p['shards_total']}", _size(p["bytes_on_disk"]))
    return Group(facts, splits)


def verify_store(path: str | Path) -> dict[str, Any]:
    """Every written shard checked against its recorded checksum (featcache/verify.py), naming bad ones."""
    group, manifest = open_manifest(path)
    return verify_group(group, manifest)
