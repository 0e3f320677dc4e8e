"""The Optuna side of `lst sweep`: storage URLs, the study (sampler and pruner), and what a resumed or
joined study must agree on (store, backbone, layers, metric, space)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.errors import SweepError, expected
from featcache.reader import StoreReader

from . import space as S

if TYPE_CHECKING:
    from .config import SweepConfig


SCHEMA_RETRIES = 8
CLAIM_LOCK = ".claim.lock"  # the name claims.claim_lock uses in each sweep folder
# What the loser of two processes creating one RDB schema at once gets (RDBStorage runs CREATE TABLE and
# stamps alembic_version when it opens a storage): seen as 1 in 3 with two openers of a new sqlite file.
_RACE = ("already exists", "UNIQUE constraint failed: alembic_version", "duplicate key", "database is locked")


def _schema_race(err: BaseException) -> bool:
    return any(s in str(err) for s in _RACE)


def open_storage(url: str):
    """An Optuna storage for `url`; journal:///path/file.log is a JournalFileBackend (shared filesystems).
    Another process opening the same new RDB storage (a second `lst sweep`, a dashboard, a script reading
    study.db) races this one to create its tables; the loser retries instead of ending the sweep."""
    import optuna

    hint = ("Give sqlite:///path.db, an RDB URL (postgresql://..., mysql://...) whose server and driver are "
            "reachable, or journal:///shared/path/file.log.")
    try:
        if url.startswith("journal://"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url[len("journal://"):])
            if not path.parent.is_dir():
                raise FileNotFoundError(f"no folder {path.parent}")
            return JournalStorage(JournalFileBackend(str(path)))
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        for attempt in range(SCHEMA_RETRIES):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
            except Exception as err:  # sqlalchemy's errors: re-raised unless it is the race below
                if attempt + 1 == SCHEMA_RETRIES or not _schema_race(err):
                    raise
                time.sleep(0.1 * (attempt + 1))
    except Exception as err:  # noqa: BLE001 - drivers raise many types; the user needs the one line
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise SweepError(expected("a reachable Optuna storage", f"'{redact(url)}' ({type(err).__name__}: {detail})",
                                  hint)) from None


_ENGINES: dict[str, object] = {}  # one small SQLAlchemy engine per RDB URL and process, for study_lock


def _lock_key(name: str) -> int:
    """A signed 63-bit key for the study's advisory lock (the same on every machine)."""
    return int.from_bytes(hashlib.sha1(f"lst-claim:{name}".encode()).digest()[:8], "big") >> 1


@contextlib.contextmanager
def study_lock(cfg: SweepConfig) -> Iterator[None]:
    """Held while a worker claims trials, so that sweeps on several machines (each with its own --out, hence
    its own claim lock file) never claim more than --trials between them:
    - postgresql://: a transaction-scoped advisory lock (pg_advisory_xact_lock) on the study's key; the server
      drops it when the holder's connection closes, a process killed -9 included;
    - mysql://: GET_LOCK on the study's name (also dropped with the connection);
    - sqlite:///path: the claim lock file of the database's folder (one machine by construction);
    - journal files: none (the per-folder lock only: one extra trial per extra machine is possible)."""
    url = cfg.storage_url
    if url.startswith("sqlite:///"):
        lock = Path(url[len("sqlite:///"):]).resolve().parent / CLAIM_LOCK
        if lock == Path(cfg.out).resolve() / CLAIM_LOCK:  # the database is in --out: claim_lock holds it already
            yield
            return
        with open(lock, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    dialect = url.split(":", 1)[0].split("+", 1)[0]
    if dialect not in ("postgresql", "mysql"):
        yield
        return
    import sqlalchemy as sa

    engine = _ENGINES.get(url)
    if engine is None:
        engine = _ENGINES[url] = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        if dialect == "postgresql":
            with conn.begin():  # the lock lives until this transaction ends
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(cfg.name)})
                yield
        else:
            name = f"lst-claim-{_lock_key(cfg.name):x}"
            conn.execute(sa.text("SELECT GET_LOCK(:n, -1)"), {"n": name})
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": name})


def redact(url: str) -> str:
    if "@" not in url:
        return url
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    return url


def sampler_seed(cfg: SweepConfig, storage, worker: int) -> int | None:
    """A seed per worker and per resumption: one shared seed would make K workers (or a resumed study)
    redraw the start-up trials already drawn. Same seed + same history -> same suggestions."""
    if cfg.seed is None:
        return None
    import optuna

    held = 0
    if cfg.name in [s.study_name for s in optuna.get_all_study_summaries(storage)]:
        held = len(optuna.load_study(study_name=cfg.name, storage=storage).get_trials(deepcopy=False))
    return cfg.seed + 100_003 * worker + held


def open_study(cfg: SweepConfig, storage, create: bool = False, worker: int = 0):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep logs one line per trial itself
    # Median rule from the 5th trial and the 2nd epoch (on_epoch reports epochs from 1).
    pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2) if cfg.prune \
        else optuna.pruners.NopPruner()
    sampler = optuna.samplers.TPESampler(n_startup_trials=8, seed=sampler_seed(cfg, storage, worker))
    if create:
        return optuna.create_study(storage=storage, study_name=cfg.name, direction="maximize", sampler=sampler,
                                   pruner=pruner, load_if_exists=True)
    return optuna.load_study(study_name=cfg.name, storage=storage, sampler=sampler, pruner=pruner)


def identity(cfg: SweepConfig, store: StoreReader, space: dict[str, S.Param], metric: str) -> dict[str, Any]:
    """What a resumed or joined study must agree on."""
    m = store.manifest
    return {"dataset_fingerprint": m["dataset"]["fingerprint"], "backbone_revision": m["backbone"]["revision"],
            "layers": m["layers"], "metric": metric, "space": {k: p.to_json() for k, p in sorted(space.items())}}


def check_identity(study, ident: dict[str, Any], cfg: SweepConfig) -> None:
    old = study.user_attrs.get("lst")
    if old is None:
        study.set_user_attr("lst", ident)
        study.set_user_attr("store", str(cfg.store))
        return
    for key, value in ident.items():
        was = old.get(key)
        if was != value:
            if key == "space":  # name only the parameters that changed
                changed = sorted(k for k in {*value, *was} if value.get(k) != was.get(k))
                value = {k: value.get(k) for k in changed}
                was = {k: was.get(k) for k in changed}
            raise SweepError(expected(f"the same {key.replace('_', ' ')} as the existing study '{cfg.name}'",
                                      f"{value} (the study has {was})",
                                      "Resume with the original store and space, or use a new --out or "
                                      "--study-name."))
