"""Checking a store's bytes against the checksums its writer recorded (`lst inspect --verify`).

Each shard's crc32 (hidden states, plus int8 scales) is written beside its done mark; readers verify
a shard the first time they touch it, and this module checks them all, naming every bad one. Re-running
the same `lst extract` recomputes exactly those (featcache/writer.py).
"""

from __future__ import annotations

from typing import Any

import zarr

from .compress import basis_problem, group_key
from .manifest import compression_of, part_layers
from .progress import progress_bar
from .reader import CHECKSUMS, PartReader


def part_readers(group: zarr.Group, manifest: dict[str, Any]) -> list[PartReader]:
    """A reader for every part of every split the manifest names (complete or not)."""
    out = []
    for split in manifest["splits"]:
        for part in manifest["splits"][split].get("parts", {"": {}}):
            path = f"{split}/{part}" if part else split
            out.append(PartReader(group[path], path, manifest["store_dtype"], part_layers(manifest, part),
                                  check_done=False))
    return out


def verify_group(group: zarr.Group, manifest: dict[str, Any], show: bool = True) -> dict[str, Any]:
    """{'checked': shards verified, 'bad': [{'part', 'shard', 'problem'}], 'without_checksums': [parts],
    'bad_bases': [{'part', 'problem'}] (a compressed store's PCA bases)}.

    Only shards marked done are checked (the others are still to be written, not damaged)."""
    readers = part_readers(group, manifest)
    bad, checked, without = [], 0, []
    with progress_bar("verify", sum(r.n_shards for r in readers), unit="shard", disable=not show) as bar:
        for r in readers:
            if CHECKSUMS not in r.group:
                without.append(r.name)
                bar.advance(r.n_shards)
                continue
            done = r.group["shard_done"][:]
            for k in range(r.n_shards):
                if done[k]:
                    problem = r.shard_problem(k)
                    checked += 1
                    if problem is not None:
                        bad.append({"part": r.name, "shard": k, "problem": problem})
                bar.advance()
    record = compression_of(manifest) or {"parts": {}}
    bad_bases = [{"part": group_key(p), "problem": problem} for p, facts in record["parts"].items()
                 if (problem := basis_problem(group, p, facts)) is not None]
    return {"checked": checked, "bad": bad, "without_checksums": without, "bad_bases": bad_bases}
