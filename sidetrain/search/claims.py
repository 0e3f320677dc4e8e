"""Which process runs which trial, on one machine or many: claims under a lock file in OUT (so K workers
never overshoot the budget), heartbeats, and recovery of trials whose worker died.

Each running trial records its host, pid and a heartbeat in its user attributes. Before a worker claims
a trial it fails RUNNING trials whose process is dead (same host) or whose heartbeat is stale (another
host), and enqueues their parameters again, so a killed trial is retried, not lost. This needs nothing
from the storage backend, so SQLite, RDB servers and journal files behave alike.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import space as S

if TYPE_CHECKING:
    from .config import SweepConfig

log = logging.getLogger(__name__)


@contextlib.contextmanager
def claim_lock(out: Path) -> Iterator[None]:
    with open(out / ".claim.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(trial, now: float, host: str, stale_after_s: float) -> bool:
    attrs = trial.user_attrs
    if attrs.get("host") == host and "pid" in attrs:
        return not _alive(int(attrs["pid"]))
    start = trial.datetime_start.timestamp() if trial.datetime_start else now
    return now - float(attrs.get("heartbeat", start)) > stale_after_s


def recover_stale(study, cfg: SweepConfig) -> list[int]:
    """Fail RUNNING trials of dead workers and enqueue their parameters again; the numbers failed."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    host, now, failed = socket.gethostname(), time.time(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _is_stale(t, now, host, cfg.stale_after_s):
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "error", "worker died (killed or lost) mid-trial")
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another worker got there first and re-enqueued it
        failed.append(t.number)
        retries = int(t.user_attrs.get("retries", 0))
        if retries < cfg.max_retries:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "retries": retries + 1})
            log.warning("trial %d was left RUNNING by a dead worker: failed it and queued its settings again",
                        t.number)
        else:
            log.warning("trial %d died %d times: not retried again", t.number, retries + 1)
    return failed


def budget_left(study, cfg: SweepConfig) -> int:
    from optuna.trial import TrialState

    taken = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    return cfg.trials - len(taken)


def claim(study, cfg: SweepConfig, worker: int):
    """Ask for the next trial if the budget allows (call under the claim lock)."""
    if budget_left(study, cfg) <= 0:
        return None
    trial = study.ask()
    for key, value in {"host": socket.gethostname(), "dir": str(Path(cfg.out).resolve()), "pid": os.getpid(),
                       "worker": worker, "heartbeat": time.time(), "run": f"trials/{trial.number}"}.items():
        trial.set_user_attr(key, value)
    return trial


def claim_pool(cfg: SweepConfig, space: dict[str, S.Param], study, worker: int, n: int) -> list[tuple[Any, dict[str, Any]]]:
    """Up to `n` trials, each sampled freely, with their settings (call under the claim lock). The sweep
    groups them into stacks by shape afterwards (sweep.stacks), so stacking does not narrow the search."""
    pool = []
    while len(pool) < n:
        trial = claim(study, cfg, worker)
        if trial is None:
            break
        pool.append((trial, S.suggest(trial, space)))
    return pool


@contextlib.contextmanager
def heartbeat(trial, every_s: float) -> Iterator[None]:
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):  # a missed beat is harmless; the next one catches up
                trial.set_user_attr("heartbeat", time.time())

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial.number}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
