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
