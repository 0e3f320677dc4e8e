"""benchmarks/bench_levers.py's table: mean and spread over seeds, and whether the peers' rows compare."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_levers import markdown, summarise


def results(lst_seed0: float) -> dict:
    runs = [{"dev": lst_seed0}, {"dev": 0.80}, {"dev": 0.82}]
    row = {"dev": summarise([r["dev"] for r in runs]), "seconds": 10.0, "runs": runs}
    return {"seeds": [0, 1, 2], "levers": {"lst": ""}, "tasks": {"mrpc": {
        "metric": "f1", "splits": ["dev"], "probe": {"dev": 0.77}, "levers": {"lst": row},
        "peers": {"LST defaults in results/peers.json": {"dev": 0.79}, "LoRA r=8 lr 0.0005": {"dev": 0.85}}}}}


def test_the_table_gives_mean_and_spread_and_says_whether_the_peers_compare():
    same = markdown(results(0.79))
    assert "0.8033 ± 0.0125" in same and "peer rows comparable" in same and "0.8500" in same
    assert "NOT comparable" in markdown(results(0.7906))  # another run of the defaults: other rows or code
