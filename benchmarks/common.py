"""Shared helpers of the benchmarks: machine facts, and writing results/<name>.json and .md."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

log = logging.getLogger("bench")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def machine() -> dict[str, Any]:
    """What the numbers were measured on (a shared machine is noisy: the load average says how much)."""
    import numpy as np
    import torch
    import zarr

    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "zarr": zarr.__version__,
                         "numpy": np.__version__}}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _descendants(pid: int) -> list[int]:
    """pid and every process below it (a sweep's workers, a DataLoader's), from /proc/<pid>/task/*/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                continue
    return out


def rss_kinds(pid: int) -> dict[str, int]:
    """RssAnon and RssFile in bytes, summed over pid and its descendants (0 for a process gone)."""
    total = {"RssAnon": 0, "RssFile": 0}
    for p in _descendants(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key = line.split(":", 1)[0]
            if key in total:
                total[key] += int(line.split()[1]) * 1024
    return total


def run_measured(cmd: list[str], interval: float = 0.02, loaded_marker: str = "LOADED",
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run cmd in a child process, sampling its (and its children's) RssAnon / RssFile every `interval` s.

    Returns wall seconds, return code, stdout, the tail of stderr, the peaks of RssAnon, RssFile and their
    sum, and the RSS (anon + file) when the child printed a line starting with `loaded_marker` (None if it
    never did), so that a caller can report the peak above the loaded model or store."""
    import subprocess
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = {"RssAnon": 0, "RssFile": 0, "total": 0}
    loaded: dict[str, int] = {}
    stdout: list[str] = []
    stderr: list[str] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = rss_kinds(proc.pid)
            peak["RssAnon"] = max(peak["RssAnon"], now["RssAnon"])
            peak["RssFile"] = max(peak["RssFile"], now["RssFile"])
            peak["total"] = max(peak["total"], now["RssAnon"] + now["RssFile"])
            done.wait(interval)

    def read_out() -> None:
        for line in proc.stdout:
            if line.startswith(loaded_marker) and not loaded:
                now = rss_kinds(proc.pid)
                loaded.update(total=now["RssAnon"] + now["RssFile"], anon=now["RssAnon"])
            stdout.append(line)

    def read_err() -> None:
        for line in proc.stderr:
            stderr.append(line)
            del stderr[:-200]

    threads = [threading.Thread(target=f, daemon=True) for f in (sample, read_out, read_err)]
    for t in threads:
        t.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    done.set()
    for t in threads:
        t.join()
    return {"cmd": cmd, "rc": rc, "wall_seconds": wall, "stdout": "".join(stdout), "stderr_tail": "".join(stderr[-40:]),
            "peak_rss_anon_bytes": peak["RssAnon"], "peak_rss_file_bytes": peak["RssFile"],
            "peak_rss_bytes": peak["total"], "rss_when_loaded_bytes": loaded.get("total"),
            "rss_anon_when_loaded_bytes": loaded.get("anon")}


def write_results(name: str, results: dict[str, Any], markdown: str, command: str) -> tuple[Path, Path]:
    """results/<name>.json (with the command and machine) and results/<name>.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {"command": command, "machine": machine(), **results}
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    header = (f"Command: `{command}`  \nMeasured {m['date']} on {m['processor']}, {m['cpus']} CPUs, "
              f"torch {m['versions']['torch']} ({m['torch_threads']} threads), zarr {m['versions']['zarr']}; "
              f"load average {m['load_average_1m']} at the end.\n\n")
    md_path.write_text(markdown.split("\n", 1)[0] + "\n\n" + header + markdown.split("\n", 1)[1].lstrip("\n"))
    log.info("wrote %s and %s", json_path, md_path)
    return json_path, md_path
