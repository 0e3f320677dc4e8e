"""One writer per store: a lease taken before anything is written, held until the extraction ends.

The lease lives beside the store (`<out>.lst-lease`), so it never mixes with the store's own files:
- local paths (and file://): an exclusive `flock` on that file, which the kernel drops the moment the
  holder dies, so a killed writer never leaves a stale lease; the file says who holds it;
- s3:// and gs:// (gcs://): an object naming its holder and an expiry, written create-if-absent by the store
  itself (S3: PutObject with If-None-Match: *; GCS: ifGenerationMatch=0), so of two writers starting at
  the same instant exactly one gets it. It is renewed by a heartbeat thread and taken over once past its
  expiry (its holder died or lost the network), both as replace-if-unchanged (S3: If-Match on the ETag
  read; GCS: ifGenerationMatch on the generation read): of two takers, one wins;
- other fsspec URLs (memory://, azure, ...): the same object, but fsspec offers no compare-and-swap there,
  so a taker writes its claim, waits a moment and reads it back: two writers starting within that moment
  can still collide (documented limit).
Under torchrun rank 0 takes the lease for the whole job; the ranks write disjoint shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from .destination import filesystem, local_path, unreachable
from .errors import StoreError

SUFFIX = ".lst-lease"
TTL_S = 60.0  # object stores: a lease not renewed for this long is stale
SETTLE_S = 0.5  # object stores without conditional writes: wait between writing a claim and reading it back
EXACT_PROTOCOLS = ("s3", "s3a", "gs", "gcs")  # stores that write create-if-absent (see _Conditional)
log = logging.getLogger(__name__)


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


class _Conditional:
    """One object written only under a precondition: `put(data, None)` creates it if absent, `put(data, token)`
    replaces it if it is still the version `token` names; both return the new version's token, or None when
    the precondition failed (someone else wrote first). `read` returns (bytes, token) from one request."""

    def __init__(self, fs, key: str):
        from fsspec.asyn import sync

        self.fs, self.key = fs, key
        self.bucket, self.name = key.split("/", 1)
        self._sync = lambda coro_fn, *a: sync(fs.loop, coro_fn, *a)

    def read(self) -> tuple[bytes, str] | None:
        return self._sync(self._read)

    def put(self, data: bytes, token: str | None) -> str | None:
        return self._sync(self._put, data, token)

    def delete(self, token: str) -> None:
        self._sync(self._delete, token)


class _S3(_Conditional):
    """S3 conditional writes (PutObject If-None-Match: * / If-Match: ETag), through s3fs's own client."""

    async def _client(self):
        await self.fs.set_session()
        return await self.fs.get_s3(self.bucket)

    @staticmethod
    def _code(err: BaseException) -> str:
        return str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))

    async def _read(self) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        s3 = await self._client()
        try:
            resp = await s3.get_object(Bucket=self.bucket, Key=self.name)
        except ClientError as err:
            if self._code(err) in ("NoSuchKey", "404"):
                return None
            raise
        try:
            return await resp["Body"].read(), resp["ETag"]
        finally:
            resp["Body"].close()

    async def _put(self, data: bytes, token: str | None) -> str | None:
        from botocore.exceptions import ClientError

        s3 = await self._client()
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            return (await s3.put_object(Bucket=self.bucket, Key=self.name, Body=data, **condition))["ETag"]
        except ClientError as err:
            # 412: the precondition failed; 409: a concurrent conditional write to the same key won; 404: an
            # If-Match on a key deleted meanwhile
            if self._code(err) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey"):
                return None
            raise

    async def _delete(self, token: str) -> None:
        s3 = await self._client()
        await s3.delete_object(Bucket=self.bucket, Key=self.name, IfMatch=token)


class _GCS(_Conditional):
    """GCS generation preconditions (ifGenerationMatch=0 / =generation), through gcsfs's JSON API calls.
    Not exercised by the test suite (no GCS emulator here): written against gcsfs 2026.10's `_call`."""

    async def _read(self) -> tuple[bytes, str] | None:
        status, headers, _, body = await self.fs._request("GET", "b/{}/o/{}", self.bucket, self.name, alt="media")
        if status == 404:
            return None
        if status >= 400:
            raise OSError(f"GET {self.key}: HTTP {status}")
        gen = {k.lower(): v for k, v in headers.items()}.get("x-goog-generation")
        return body, str(gen)

    async def _put(self, data: bytes, token: str | None) -> str | None:
        from urllib.parse import quote

        try:
            out = await self.fs._call("POST", f"{self.fs._location}/upload/storage/v1/b/{quote(self.bucket)}/o",
                                      uploadType="media", name=self.name, ifGenerationMatch=token or "0",
                                      data=data, json_out=True)
        except (FileExistsError, FileNotFoundError):  # gcsfs raises FileExistsError for HTTP 412
            return None
        return str(out["generation"])

    async def _delete(self, token: str) -> None:
        await self.fs._call("DELETE", "b/{}/o/{}", self.bucket, self.name, ifGenerationMatch=token)


def _conditional(fs, key: str) -> _Conditional | None:
    """The exact create-if-absent writer for this filesystem, or None where fsspec offers none."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if not set(protocols) & set(EXACT_PROTOCOLS) or "/" not in key.strip("/"):
        return None
    return (_S3 if set(protocols) & {"s3", "s3a"} else _GCS)(fs, key.strip("/"))


@contextlib.contextmanager
def _exact_lease(out: str, cond: _Conditional, ttl_s: float) -> Iterator[dict[str, Any]]:
    me = _holder()

    def claim() -> bytes:
        return json.dumps({**me, "expires": time.time() + ttl_s}).encode()

    try:
        for _ in range(5):  # each turn: create, or take over a stale lease; a lost race re-reads
            token = cond.put(claim(), None)
            if token is not None:
                break
            found = cond.read()
            if found is None:
                continue  # released between our create and our read
            try:
                current = json.loads(found[0])
            except ValueError:
                current = {}
            if current.get("expires", 0) > time.time():
                raise _refused(out, current)
            token = cond.put(claim(), found[1])  # replace exactly the stale version we read
            if token is not None:
                log.warning("took over the expired lease of %s on %s", _describe(current), out)
                break
        else:
            raise _refused(out, {})
    except StoreError:
        raise
    except Exception as err:  # an unreachable endpoint, no permission: one line, as every --out error
        raise unreachable(out, err) from err
    held = [token]

    def renew() -> bool:
        try:
            token = cond.put(claim(), held[0])
        except Exception as err:  # noqa: BLE001 - a missed renewal only shortens the lease
            log.debug("lease renewal on %s missed: %s", out, err)
            return True
        if token is None:
            log.error("the lease on %s was taken over by another writer (this one missed its renewals for "
                      "%.0f s); stop this extraction", out, ttl_s)
            return False
        held[0] = token
        return True

    with heartbeat(renew, ttl_s / 3, lambda: cond.delete(held[0])):
        yield me


@contextlib.contextmanager
def _object_lease(out: str, ttl_s: float) -> Iterator[dict[str, Any]]:
    fs, root = filesystem(out)
    key = root.rstrip("/") + SUFFIX
    cond = _conditional(fs, key)
    if cond is not None:
        with _exact_lease(out, cond, ttl_s) as me:
            yield me
        return
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
    def renew() -> bool:
        with contextlib.suppress(Exception):  # a missed renewal only shortens the lease
            write()
        return True

    def release() -> None:
        if (read() or {}).get("id") == me["id"]:
            fs.rm_file(key)

    with heartbeat(renew, ttl_s / 3, release):
        yield me


@contextlib.contextmanager
def heartbeat(renew: Callable[[], bool], period_s: float, release: Callable[[], None]) -> Iterator[None]:
    """Runs `renew` every `period_s` in a daemon thread while the block runs (until it returns False: the lease
    was lost), then `release` (its errors ignored: a lease left behind expires on its own)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(period_s):
            if not renew():
                return

    thread = threading.Thread(target=beat, name="lst-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            release()
