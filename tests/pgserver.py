"""A throw-away PostgreSQL server for tests and benchmarks: Debian's binaries, a temp folder, loopback only.

initdb refuses to run as root, so under root (CI, these machines) the server runs as the `postgres` user
that Debian's package creates (or a system user `lst-pg` made with useradd where it is missing).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator


def binaries() -> str | None:
    """The folder holding initdb and pg_ctl, or None when PostgreSQL's server is not installed."""
    for folder in [os.path.dirname(shutil.which("initdb") or ""), *sorted(glob.glob("/usr/lib/postgresql/*/bin"))]:
        if folder and all(os.access(os.path.join(folder, b), os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _server_user() -> str | None:
    """The user to run the server as (None: this one), creating `lst-pg` under root where needed."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "lst-pg"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "lst-pg"], check=True)
    return "lst-pg"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres(db: str = "lst") -> Iterator[str]:
    """Start a server, create database `db`, yield its URL (postgresql://lst@127.0.0.1:PORT/db), stop it."""
    folder = binaries()
    if folder is None:
        raise FileNotFoundError("PostgreSQL's initdb / pg_ctl not found (Debian: apt-get install postgresql)")
    user = _server_user()
    root = tempfile.mkdtemp(prefix="lst-pg-")
    data, port = os.path.join(root, "data"), _free_port()
    if user is not None:
        info = pwd.getpwnam(user)
        os.chown(root, info.pw_uid, info.pw_gid)
    prefix = ["runuser", "-u", user, "--"] if user is not None else []

    def run(*cmd: str) -> None:
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, cwd=root, timeout=120)

    run(os.path.join(folder, "initdb"), "-D", data, "-U", "lst", "--auth=trust", "-E", "UTF8", "--no-sync")
    # loopback only; the unix socket in the temp folder (not /var/run/postgresql, which needs root)
    opts = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=50"
    run(os.path.join(folder, "pg_ctl"), "-D", data, "-o", opts, "-l", os.path.join(root, "log"), "-w", "-t", "60",
        "start")
    try:
        import psycopg

        for attempt in range(50):
            try:
                with psycopg.connect(host="127.0.0.1", port=port, user="lst", dbname="postgres",
                                     autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{db}"')
                break
            except psycopg.OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.2)
        yield f"postgresql://lst@127.0.0.1:{port}/{db}"
    finally:
        with contextlib.suppress(Exception):
            run(os.path.join(folder, "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
