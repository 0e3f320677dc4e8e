"""`lst sweep`: an Optuna study of side-network settings that reads one feature store for every trial.

    run_sweep(SweepConfig(store="banking.zarr", out="sweeps/b", trials=32))

Layout of OUT: study.db (default storage), space.json, trials/<number>/ (one `lst train` run folder
per trial), logs/ (one log per spawned worker), summary.json, summary.png, best -> trials/<best>.

Here: the options, running trials (alone or stacked) and worker processes. The Optuna study and its
storage are in study.py; which worker runs which trial, heartbeats and recovery of killed trials in
claims.py; summary.json and the plot in report.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from featcache.errors import LstError, SweepError, expected
from featcache.progress import progress_bar
from featcache.reader import StoreReader, open_store

from .. import metrics as M
from ..config import TrainConfig
from ..recipe import pick_eval_split
from ..run_files import prepare_run_dir
from ..train import train
from . import space as S
from .claims import budget_left, claim_lock, claim_pool, heartbeat, recover_stale
from .config import SweepConfig
from .study import check_identity, identity, open_storage, open_study, redact, study_lock

log = logging.getLogger(__name__)
MAX_FAILURES_IN_A_ROW = 3
POOL_STACKS = 1  # --stack K: K trials sampled at a time (TPE keeps its feedback every K), then grouped by shape


@dataclass
class _Context:
    cfg: SweepConfig
    store: StoreReader
    space: dict[str, S.Param]
    metric: str
    stackable: bool = False  # the store kind's trials may train K at a time (search/stacked.py)
    stack: int = 1  # --stack as run (SweepConfig.stack_for)


def _prepare(cfg: SweepConfig, store: StoreReader | None = None) -> _Context:
    store = store or open_store(cfg.store)
    m = store.manifest
    if pick_eval_split(store, None, "train") is None:
        raise SweepError(expected("an evaluation split (dev, validation, valid or val) in the store",
                                  f"splits {store.split_names}", "Extract one: trials are compared on it."))
    metric = cfg.metric or M.default_metric(m)
    if metric not in M.METRICS:
        raise SweepError(expected(f"--metric one of {sorted(M.METRICS)}", metric))
    stackable = S.search_facts(m).stackable
    if (cfg.stack or 1) > 1 and not stackable:
        raise SweepError(expected("--stack 1 for this store (its kind's trials cannot be trained K at a time)",
                                  f"--stack {cfg.stack}", "Drop --stack."))
    return _Context(cfg, store, S.resolve_space(m, cfg.space), metric, stackable, cfg.stack_for(stackable))


# ---------------------------------------------------------------- trials

def _train_config(ctx: _Context, trial, values: dict[str, Any]) -> TrainConfig:
    return TrainConfig(store=ctx.cfg.store, out=str(Path(ctx.cfg.out) / "trials" / str(trial.number)),
                       device=ctx.cfg.device, metric=ctx.metric, **S.to_train_kwargs(values, ctx.store.manifest))


def _pruning_hook(ctx: _Context, trial, epochs_seen: list[int]):
    import optuna

    def on_epoch(epoch: int, record: dict[str, Any]) -> None:
        epochs_seen.append(epoch)
        value = record.get(f"eval_{ctx.metric}")
        if value is None:
            return
        trial.report(float(value), epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: {ctx.metric} {value:.4f} below the median")

    return on_epoch


def _tell(ctx: _Context, study, trial, values: dict[str, Any], t0: float, summary: dict[str, Any] | None = None,
          err: BaseException | None = None, epochs_run: int = 0) -> bool:
    """Record a trial's outcome in the study; False when it failed."""
    import optuna
    from optuna.trial import TrialState

    took = time.perf_counter() - t0
    if isinstance(err, optuna.TrialPruned):
        trial.set_user_attr("epochs_run", epochs_run)
        study.tell(trial, state=TrialState.PRUNED)
        log.info("trial %d pruned after %.1f s (%s) %s", trial.number, took, err, values)
        return True
    if err is None and (summary is None or summary["best_eval"] is None):
        err = LstError("no evaluation score")
    if err is not None:
        trial.set_user_attr("error", f"{type(err).__name__}: {err}")
        study.tell(trial, state=TrialState.FAIL)
        log.warning("trial %d failed: %s: %s %s", trial.number, type(err).__name__, err, values)
        return False
    for key in ("splits", "train_seconds", "examples_per_second", "peak_memory_bytes", "trainable_parameters"):
        trial.set_user_attr(key, summary[key])
    trial.set_user_attr("epochs_run", len(summary["history"]))
    study.tell(trial, float(summary["best_eval"]))
    log.info("trial %d: %s %.4f in %.1f s %s", trial.number, ctx.metric, summary["best_eval"], took, values)
    return True


def _interrupted(study, trials) -> None:
    """Ctrl-C: fail the running trials and queue their settings for the next run instead of losing them."""
    from optuna.trial import TrialState

    for trial in trials:
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "retries": 0})


def _run_trial(ctx: _Context, study, trial, values: dict[str, Any]) -> bool:
    """Train one trial into OUT/trials/<number>/ and tell the study. False when it failed."""
    epochs_seen: list[int] = []
    t0 = time.perf_counter()
    try:
        summary = train(_train_config(ctx, trial, values), store=ctx.store,
                        on_epoch=_pruning_hook(ctx, trial, epochs_seen))
    except KeyboardInterrupt:
        _interrupted(study, [trial])
        raise
    except Exception as err:  # noqa: BLE001 - one bad trial must not end the sweep; it is recorded
        return _tell(ctx, study, trial, values, t0, err=err, epochs_run=len(epochs_seen))
    return _tell(ctx, study, trial, values, t0, summary)


def _run_stack(ctx: _Context, study, group: list[tuple[Any, dict[str, Any]]]) -> list[bool]:
    """Train a group of trials in one pass over the data (sidetrain.search.stacked) and tell each."""
    from .stacked import train_stacked

    if len(group) == 1:
        return [_run_trial(ctx, study, *group[0])]
    cfgs = [_train_config(ctx, t, v) for t, v in group]
    seen: list[list[int]] = [[] for _ in group]
    hooks = [_pruning_hook(ctx, t, s) for (t, _), s in zip(group, seen)]
    t0 = time.perf_counter()
    try:
        summaries = train_stacked(cfgs, store=ctx.store, on_epoch=hooks)
    except KeyboardInterrupt:
        _interrupted(study, [t for t, _ in group])
        raise
    except Exception as err:  # noqa: BLE001 - recorded on every member
        return [_tell(ctx, study, t, v, t0, err=err) for t, v in group]
    return [_tell(ctx, study, t, v, t0, None if "stopped" in s else s, err=s.get("stopped"), epochs_run=len(e))
            for (t, v), s, e in zip(group, summaries, seen)]


def stacks(ctx: _Context, pool: list[tuple[Any, dict[str, Any]]]) -> list[list[tuple[Any, dict[str, Any]]]]:
    """Claimed trials grouped by what a stack must share (network shape, batches: stacked.stack_key),
    in chunks of at most --stack, in the order of their first trial. Trials of kinds that cannot stack, and
    the linear probe, run alone."""
    from .stacked import stack_key

    groups: dict[tuple, list[tuple[Any, dict[str, Any]]]] = {}
    for t, v in pool:
        cfg = _train_config(ctx, t, v)
        key = stack_key(cfg) if ctx.stackable and cfg.head == "lst" and not cfg.online else ("alone", t.number)
        groups.setdefault(key, []).append((t, v))
    k = ctx.stack
    return [g[i:i + k] for g in groups.values() for i in range(0, len(g), k)]


@contextlib.contextmanager
def _quiet_epochs() -> Iterator[None]:
    """One log line per trial, not one per epoch (the epochs are in each run's metrics.json)."""
    train_log = logging.getLogger("sidetrain.train")
    level = train_log.level
    train_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        train_log.setLevel(level)


def work(ctx: _Context, study, worker: int = 0, bar=None) -> int:
    """Claim and run trials until the study holds `trials` finished ones; the number this worker ran.

    With --stack K: sample a pool of trials (claim_pool, K at a time), group them by shape into stacks of
    up to K (`stacks`), run each stack in one pass. Every claimed trial beats while its pool runs."""
    out, done, failures = Path(ctx.cfg.out), 0, 0
    with _quiet_epochs():
        while True:
            with claim_lock(out), study_lock(ctx.cfg):  # this folder's workers, then every machine's
                recover_stale(study, ctx.cfg)
                # K at a time, but no more than this worker's share of what is left (other workers get theirs)
                share = -(-budget_left(study, ctx.cfg) // ctx.cfg.workers)
                pool = claim_pool(ctx.cfg, ctx.space, study, worker, max(1, min(POOL_STACKS * ctx.stack, share))
                                  if ctx.stack > 1 else 1)
            if not pool:
                return done
            groups = stacks(ctx, pool)
            told: set[int] = set()
            group: list[tuple[Any, dict[str, Any]]] = []
            with contextlib.ExitStack() as beats:
                for t, _ in pool:
                    beats.enter_context(heartbeat(t, ctx.cfg.heartbeat_s))
                try:
                    for group in groups:
                        oks = _run_stack(ctx, study, group)
                        told.update(t.number for t, _ in group)
                        for ok in oks:
                            done, failures = (done + 1, 0) if ok else (done, failures + 1)
                            if ok and bar is not None:
                                bar.advance()
                        if failures >= MAX_FAILURES_IN_A_ROW:
                            break
                except KeyboardInterrupt:  # the claimed trials not yet run are queued again too
                    _interrupted(study, [t for g in groups for t, _ in g
                                         if t.number not in told and t not in [x for x, _ in group]])
                    raise
                _fail_unrun(study, [t for t, _ in pool if t.number not in told])
            if failures >= MAX_FAILURES_IN_A_ROW:
                raise SweepError(f"{failures} trials in a row failed in worker {worker}; the errors are in the "
                                 "trials' user attributes and the log. Fix it and re-run the same command to resume.")


def _fail_unrun(study, trials) -> None:
    """Claimed trials a pool stopped before running (too many failures): failed, settings queued again."""
    if trials:
        _interrupted(study, trials)


def _worker_main(cfg: SweepConfig, worker: int, threads: int) -> None:
    """Entry of a spawned worker process: its own store (read once), storage and log file."""
    import rich
    import torch

    log_path = Path(cfg.out) / "logs" / f"worker-{worker}.log"
    logging.basicConfig(level=logging.INFO, force=True, filename=log_path,
                        format=f"%(asctime)s worker {worker} %(levelname)s %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    rich.get_console().quiet = True  # the parent shows the one progress bar
    torch.set_num_threads(threads)
    try:
        ctx = _prepare(cfg)
        study = open_study(cfg, open_storage(cfg.storage_url), worker=worker)
        log.info("worker %d ran %d trials", worker, work(ctx, study, worker))
    except BaseException:
        log.exception("worker %d stopped", worker)
        raise


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _run_workers(cfg: SweepConfig, study) -> None:
    """K spawned processes join the study; this one shows progress read back from the storage."""
    (Path(cfg.out) / "logs").mkdir(exist_ok=True)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.workers)
    mp = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    procs = [mp.Process(target=_worker_main, args=(cfg, k, threads), name=f"lst-sweep-{k}")
             for k in range(cfg.workers)]
    for p in procs:
        p.start()
    log.info("%d workers started (%d threads each); logs in %s", cfg.workers, threads, Path(cfg.out) / "logs")
    try:
        with progress_bar("sweep", cfg.trials, unit="trial") as bar:
            shown = 0
            while any(p.is_alive() for p in procs):
                now = _finished(study)
                bar.advance(max(0, now - shown))
                shown = max(shown, now)
                time.sleep(1.0)
            bar.advance(max(0, _finished(study) - shown))
    finally:
        for p in procs:
            p.join()
    bad = [(k, p.exitcode) for k, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        k, code = bad[0]
        tail = _tail(Path(cfg.out) / "logs" / f"worker-{k}.log")
        raise SweepError(f"Worker {k} exited with code {code}: {tail} See {cfg.out}/logs/. "
                         "Re-run the same command to resume.")


def _tail(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    errors = [x for x in lines if "Error" in x or "error" in x]
    return (errors or lines or ["(no log)"])[-1][-300:]


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Oversubscribed CPUs make torch's thread pool spin: a sweep on a shared machine wants few threads."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _storage_names(cfg: SweepConfig) -> tuple[str, ...]:
    """A journal storage file the user put inside --out (and its lock): lst writes those too."""
    if not (cfg.storage or "").startswith("journal://"):
        return ()
    path = Path(cfg.storage[len("journal://"):])
    if path.resolve().parent != Path(cfg.out).resolve():
        return ()
    return path.name, f"{path.name}.lock"


def run_sweep(cfg: SweepConfig, store: StoreReader | None = None) -> dict[str, Any]:
    """Create or resume the study, run trials until it holds `cfg.trials` finished ones, write results."""
    out = Path(cfg.out)
    ctx = _prepare(cfg, store)  # validates store and space before anything is created
    prepare_run_dir(out, "sweep", also=_storage_names(cfg))  # never writes into what lst did not write
    study = open_study(cfg, open_storage(cfg.storage_url), create=True)
    check_identity(study, identity(cfg, ctx.store, ctx.space, ctx.metric), cfg)
    (out / "sweep.json").write_text(json.dumps({**asdict(cfg), "storage": redact(cfg.storage_url),
                                                "study_name": cfg.name}, indent=2, sort_keys=True))
    (out / "space.json").write_text(json.dumps({k: p.to_json() for k, p in ctx.space.items()}, indent=2))
    before = _finished(study)
    log.info("study '%s' in %s: %d of %d trials finished", cfg.name, redact(cfg.storage_url), before, cfg.trials)
    t0 = time.perf_counter()
    if cfg.workers == 1:
        with progress_bar("sweep", cfg.trials, unit="trial") as bar, _torch_threads(cfg.threads):
            bar.advance(min(before, cfg.trials))
            work(ctx, study, 0, bar)
    else:
        _run_workers(cfg, study)
    from .report import write_results

    return write_results(study, out, ctx.metric, wall_seconds=time.perf_counter() - t0)
