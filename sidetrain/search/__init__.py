"""Hyper-parameter search over one feature store (`lst sweep`): an Optuna study whose trials all read the
same store, never the backbone (sweep.py), over a search space of TrainConfig fields (space.py), with
results summarised in OUT/summary.json, OUT/summary.png and OUT/best (report.py). The Optuna storage and
study live in study.py; claiming trials across workers and machines, heartbeats and recovery of killed
trials in claims.py. Trials of the same network shape train K at a time as one K-member network in one
pass over the data (stacked.py).
"""

from featcache.errors import SweepError

from .report import load_summary, results_table, write_results
from .space import SpaceError, load_space_file, parse_space, resolve_space
from .stacked import stack_key, train_stacked
from .sweep import SweepConfig, run_sweep

__all__ = [
    "SpaceError",
    "SweepConfig",
    "SweepError",
    "load_space_file",
    "load_summary",
    "parse_space",
    "resolve_space",
    "results_table",
    "run_sweep",
    "stack_key",
    "train_stacked",
    "write_results",
]
