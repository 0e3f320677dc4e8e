"""One writer per store: a lease taken before anything is written, held until the extraction ends.

The lease lives beside the store (`<out>.lst-lease`), so it never mixes with the store's own files:
- local paths (and file://): an exclusive `flock` on that file, which the kernel drops the moment the
  holder dies, so a killed writer never leaves a stale lease; the file says who holds it;
- other fsspec URLs (s3://, gs://, memory://): an object naming its holder and an expiry, renewed by a
  heartbeat thread; a lease past its expiry (its holder died or lost the network) is taken over.
  Object stores offer no compare-and-swap through fsspec, so a taker writes its claim, waits a moment
  and reads it back: two writers starting within that moment can still collide (documented limit).
Under torchrun rank 0 takes the lease for the whole job; the ranks write disjoint shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from .destination import filesystem, local_path, unreachable
from .errors import StoreError

SUFFIX = ".lst-lease"
TTL_S = 60.0  # object stores: a lease not renewed for this long is stale
SETTLE_S = 0.5  # object stores: wait between writing a claim and reading it back


def lease_path(out: str) -> str:
    return str(out).rstrip("/") + SUFFIX


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "id": uuid.uuid4().hex}


def _describe(holder: dict[str, Any]) -> str:
    since = time.strftime("%H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {since}"


def _refused(out: str, holder: dict[str, Any]) -> StoreError:
    return StoreError(f"Another lst process is writing '{out}' ({_describe(holder)}). Wait for it to finish or stop "
                      "it, then re-run this command to resume; two writers on one store would lose data.")


@contextlib.contextmanager
def writer_lease(out: str, ttl_s: float = TTL_S) -> Iterator[dict[str, Any]]:
    """Hold the store's lease for the duration of the block; a second writer is refused naming the holder."""
    path = local_path(out)
    if path is not None:
        with _local_lease(out, str(path).rstrip("/") + SUFFIX) as me:
            yield me
    else:
        with _object_lease(out, ttl_s) as me:
            yield me


@contextlib.contextmanager
def _local_lease(out: str, file: str) -> Iterator[dict[str, Any]]:
    me = _holder()
    os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise _refused(out, holder) from None
        # the file may have been unlinked by a holder that released it after we opened it: retry then
        try:
            same = os.fstat(fd).st_ino == os.stat(file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield me
    finally:
        with contextlib.suppress(OSError):
            os.unlink(file)  # while still locked: no one can hold the unlinked file after us
        os.close(fd)


@contextlib.contextmanager
def _object_lease(out: str, ttl_s: float) -> Iterator[dict[str, Any]]:
    fs, root = filesystem(out)
    key = root.rstrip("/") + SUFFIX
    me = _holder()

    def read() -> dict[str, Any] | None:
        try:
            return json.loads(fs.cat_file(key))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    def write() -> None:
        fs.pipe_file(key, json.dumps({**me, "expires": time.time() + ttl_s}).encode())

    try:
        current = read()
        if current and current.get("id") != me["id"] and current.get("expires", 0) > time.time():
            raise _refused(out, current)
        write()
        time.sleep(SETTLE_S)
        current = read()
    except StoreError:
        raise
    except Exception as err:  # an unreachable endpoint, no permission: one line, as every --out error
        raise unreachable(out, err) from err
    if not current or current.get("id") != me["id"]:
        raise _refused(out, current or {})
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 3):
            with contextlib.suppress(Exception):  # a missed renewal only shortens the lease
                write()

    beat = threading.Thread(target=renew, name="lst-lease", daemon=True)
    beat.start()
    try:
        yield me
    finally:
        stop.set()
        beat.join(timeout=5)
        with contextlib.suppress(Exception):
            if (read() or {}).get("id") == me["id"]:
                fs.rm_file(key)
