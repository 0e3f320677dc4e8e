"""`make bench`: run every benchmarks/bench_*.py, one process each; each writes results/<name>.json and .md.

    python benchmarks/run_all.py            # all of them
    python benchmarks/run_all.py store      # only bench_store.py
    python benchmarks/run_all.py peers convergence   # lst vs full fine-tuning / LoRA, and LST's convergence

bench_peers.py needs peft (pyproject's `bench` extra; `make bench` installs it with --no-deps) and, like
bench_convergence.py, takes a long time on a CPU (docs/benchmarks.md says how long).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
log = logging.getLogger("bench")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    only = set(argv)
    scripts = [p for p in sorted(HERE.glob("bench_*.py")) if not only or p.stem.removeprefix("bench_") in only]
    if not scripts:
        log.error("No benchmark matches %s (have: %s).", sorted(only),
                  ", ".join(p.stem.removeprefix("bench_") for p in sorted(HERE.glob("bench_*.py"))))
        return 2
    failed = []
    for script in scripts:
        log.info("== %s", script.name)
        t0 = time.perf_counter()
        # a process per benchmark: one crash does not stop the others, and none warms the next one's caches
        rc = subprocess.run([sys.executable, str(script)], check=False, cwd=HERE.parent).returncode
        log.info("== %s: %s in %.0f s", script.name, "ok" if rc == 0 else f"FAILED (exit {rc})",
                 time.perf_counter() - t0)
        if rc:
            failed.append(script.name)
    if failed:
        log.error("Failed: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
