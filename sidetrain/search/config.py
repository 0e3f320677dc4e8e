"""Options of `lst sweep`: one dataclass, whose fields carry the defaults and the help the CLI shows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featcache.config import opt
from featcache.errors import SweepError, expected

DEFAULT_STACK = 8  # measured: benchmarks/results/stack.md (per member, 8 in one pass cost less than alone)


@dataclass
class SweepConfig:
    """Options of `lst sweep`; written to OUT/sweep.json."""

    store: str = opt(help="A store written by `lst extract`.")
    out: str = opt(help="Sweep folder: study.db, trials/<n>/, summary, best.")
    trials: int = opt(20, "Finished (complete or pruned) trials the study should hold (re-running resumes).")
    space: dict[str, Any] | None = opt(  # noqa: RUF009 (opt() is a field)
        None, "Search space, a YAML or JSON file (default: built from the store).")
    storage: str | None = opt(None, "Optuna storage: an RDB URL or journal:///shared/file.log (default: "
                                    "sqlite in --out).")
    study_name: str | None = opt(None, "Default: the name of --out.")
    workers: int = opt(1, "Worker processes on this machine, joining one study.")
    prune: bool = opt(True, "Stop hopeless trials early (median rule).")
    device: str = opt("auto", "auto, cpu or cuda.")
    metric: str | None = opt(None, "Metric to maximise (default per task).")
    threads: int | None = opt(None, "torch CPU threads per worker (default: torch's, or cores / workers).")
    stack: int | None = opt(None, "Train up to K trials in one pass over the data: trials are sampled freely, "
                                  "then those sharing a network shape and batch size train together "
                                  "(sidetrain/search/stacked.py). Default: 8 where the store's kind can stack "
                                  "trials (the largest K that paid on a 2-CPU machine, benchmarks/results/stack.md), "
                                  "else 1.")
    heartbeat_s: float = opt(10.0, "Seconds between a running trial's heartbeats.",
                             library_only="an internal cadence; --stale-after-s is the knob that matters")
    stale_after_s: float = opt(120.0, "A trial of another host with no heartbeat for this many seconds is "
                                      "retried.")
    max_retries: int = opt(2, "Retries of one killed trial's parameters.")
    seed: int | None = opt(None, "Seed the sampler (same seed, same store -> same trials on one worker; "
                                 "worker k and a resumed study draw from derived seeds; default: unseeded).")

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise SweepError(expected("--trials of at least 1", self.trials))
        if self.stack is not None and self.stack < 1:
            raise SweepError(expected("--stack of at least 1", self.stack))
        if self.workers < 1:
            raise SweepError(expected("--workers of at least 1", self.workers))
        if self.stale_after_s <= self.heartbeat_s:  # else live trials of other hosts would be retried
            raise SweepError(expected(f"--stale-after-s above the heartbeat interval ({self.heartbeat_s:g} s)",
                                      self.stale_after_s))
        if self.max_retries < 0:
            raise SweepError(expected("--max-retries of at least 0", self.max_retries))

    def stack_for(self, stackable: bool) -> int:
        """--stack as run: the option, else DEFAULT_STACK for kinds whose trials stack, else 1."""
        return self.stack if self.stack is not None else DEFAULT_STACK if stackable else 1

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.out).resolve() / 'study.db'}"

    @property
    def name(self) -> str:
        return self.study_name or Path(self.out).resolve().name
