"""Options of `lst sweep`: one dataclass, whose fields carry the defaults and the help the CLI shows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featcache.errors import SweepError, expected


@dataclass
class SweepConfig:
    """Options of `lst sweep`; written to OUT/sweep.json."""

    store: str
    out: str
    trials: int = 20  # finished (complete or pruned) trials the study should hold
    space: dict[str, Any] | None = None  # the raw space file mapping; None: the default space
    storage: str | None = None  # None: sqlite:///OUT/study.db; or an RDB URL, or journal:///path/file.log
    study_name: str | None = None  # None: the name of OUT
    workers: int = 1  # worker processes on this machine
    prune: bool = True
    device: str = "auto"
    metric: str | None = None
    threads: int | None = None  # torch CPU threads per worker; None: torch's default, or cores / workers
    stack: int = 1  # trials trained together in one pass (sharing network shape and batches; see sidetrain/search/stacked.py)
    heartbeat_s: float = 10.0
    stale_after_s: float = 120.0  # a trial of another host with no heartbeat for this long is retried
    max_retries: int = 2  # retries of one killed trial's parameters
    seed: int | None = None  # sampler seed (None: unseeded); worker k and a resumed study draw from derived seeds

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise SweepError(expected("--trials of at least 1", self.trials))
        if self.stack < 1:
            raise SweepError(expected("--stack of at least 1", self.stack))
        if self.workers < 1:
            raise SweepError(expected("--workers of at least 1", self.workers))

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.out).resolve() / 'study.db'}"

    @property
    def name(self) -> str:
        return self.study_name or Path(self.out).resolve().name
