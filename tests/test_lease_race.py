"""The object-store writer lease is exact on S3: two writers started at the same instant (a barrier), over
many rounds, and exactly one proceeds each round, both when the lease is free (create-if-absent,
If-None-Match: *) and when a dead writer's expired lease is there (replace-if-unchanged, If-Match: ETag).

Against moto's S3 server on loopback. moto 5.2.5 honours If-None-Match: * and If-Match on PutObject, but
checks the condition and then writes in two steps with no lock between them (real S3 makes them one atomic
step); the server here therefore handles one request at a time, so that each conditional write is atomic as
on S3: two clients still send their requests at the same instant. LST_LEASE_ROUNDS sets the rounds (40)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

pytest.importorskip("moto")
pytest.importorskip("s3fs")

from featcache.errors import StoreError
from featcache.lease import SUFFIX, writer_lease

BUCKET = "lst-lease-race"
ROUNDS = int(os.environ.get("LST_LEASE_ROUNDS", "40"))


@pytest.fixture(scope="module")
def s3():
    import boto3
    import s3fs
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app, lock = DomainDispatcherApplication(create_backend_app), threading.Lock()

    def atomic(environ, start_response):  # one request at a time: each conditional write atomic, as on S3
        with lock:
            return list(app(environ, start_response))

    server = make_server("127.0.0.1", 0, atomic, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.shutdown()
    thread.join()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()


def test_moto_honours_conditional_puts(s3):
    """What the lease relies on; if moto ignored the headers, the race test below would catch two winners."""
    import botocore

    s3.put_object(Bucket=BUCKET, Key="probe", Body=b"a", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError, match="PreconditionFailed"):
        s3.put_object(Bucket=BUCKET, Key="probe", Body=b"b", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError, match="PreconditionFailed"):
        s3.put_object(Bucket=BUCKET, Key="probe", Body=b"b", IfMatch='"not-its-etag"')
    assert s3.get_object(Bucket=BUCKET, Key="probe")["Body"].read() == b"a"


def race(url: str) -> list[str]:
    """Two writers at the same instant; each holds what it got until both have tried. Their outcomes."""
    start, tried, outcomes = threading.Barrier(2), threading.Barrier(2, timeout=60), []

    def writer() -> None:
        start.wait()
        try:
            with writer_lease(url):
                outcomes.append("proceeds")
                tried.wait()  # still held while the other tries
        except StoreError as err:
            outcomes.append("refused" if "Another lst process is writing" in str(err) else str(err))
            tried.wait()

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return sorted(outcomes)


def test_two_writers_at_the_same_instant_exactly_one_proceeds(s3):
    url = f"s3://{BUCKET}/free.zarr"
    for r in range(ROUNDS):
        assert race(url) == ["proceeds", "refused"], f"round {r}"
        assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="free.zarr")  # released


def test_two_writers_taking_over_a_dead_writers_lease_exactly_one_proceeds(s3):
    url, key = f"s3://{BUCKET}/stale.zarr", "stale.zarr" + SUFFIX
    for r in range(ROUNDS // 2):
        stale = {"pid": 1, "host": "gone", "started": time.time() - 600, "id": f"dead{r}",
                 "expires": time.time() - 1}
        s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(stale).encode())
        assert race(url) == ["proceeds", "refused"], f"round {r}"


def test_a_live_lease_is_never_taken_over(s3):
    url, key = f"s3://{BUCKET}/live.zarr", "live.zarr" + SUFFIX
    live = {"pid": 7, "host": "elsewhere", "started": time.time(), "id": "live", "expires": time.time() + 60}
    s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(live).encode())
    with pytest.raises(StoreError, match="pid 7 on elsewhere"), writer_lease(url):
        pass
    assert json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())["id"] == "live"  # untouched


def test_the_holder_renews_and_a_lost_lease_is_not_overwritten(s3, caplog):
    """Renewals replace only the holder's own version; once another writer took the lease, the old holder
    neither overwrites nor deletes it."""
    url, key = f"s3://{BUCKET}/renew.zarr", "renew.zarr" + SUFFIX
    with writer_lease(url, ttl_s=0.6) as me:
        first = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        time.sleep(0.5)  # two renewals (every ttl / 3)
        renewed = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        assert renewed["id"] == me["id"] and renewed["expires"] > first["expires"]
        thief = {**renewed, "id": "thief", "expires": time.time() + 60}
        s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(thief).encode())
        time.sleep(0.5)
    assert json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())["id"] == "thief"
    assert "taken over by another writer" in caplog.text
