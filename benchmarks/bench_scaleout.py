"""Scale-out on one machine: sweep trials per hour with 1 and 2 workers on SQLite and on PostgreSQL, and
extraction tokens per second with 1 and 2 torchrun ranks.

- Sweeps: `run_sweep` over T trials of a fixed small space (pruning off, --stack 1, 1 thread per worker) on a
  store of a randomly initialised BERT (timing only); storage sqlite:///OUT/study.db, then a throw-away
  PostgreSQL server on loopback (tests/pgserver.py: Debian's binaries; skipped when absent). Wall time
  from the first claim to the last trial, store already open.
- Extraction: `torchrun --standalone --nproc-per-node K` running extract() with 1 thread per rank, into a
  local store; tokens / the extraction's own wall time (rank 0, after the backbone has loaded).
Two workers on a 2-core machine can at best double; the ratios say how close they came.
Sizes: LST_BENCH_SCALEOUT_TRIALS (8), LST_BENCH_SCALEOUT_ROWS (1500). Results: results/scaleout.{json,md}.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # run as a script: `common` sits beside it
sys.path.insert(0, str(ROOT / "tests"))  # pgserver: the throw-away PostgreSQL server of the tests
from common import log, setup_logging, write_results

TRIALS = int(os.environ.get("LST_BENCH_SCALEOUT_TRIALS", "8"))
ROWS = int(os.environ.get("LST_BENCH_SCALEOUT_ROWS", "1500"))
SPACE = {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "reduction_factor": [4, 8], "batch_size": 32, "epochs": 3}
WORDS = [f"w{i}" for i in range(40)]

EXTRACT = textwrap.dedent("""
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)
    from featcache import ExtractConfig, extract
    model, data, out, report = sys.argv[1:5]
    t0 = time.perf_counter()
    manifest = extract(ExtractConfig(model=model, dataset=data, out=out, max_length=64, batch_size=32,
                                     device="cpu", store_dtype="fp16", error_sample=0))
    if os.environ.get("RANK", "0") == "0":
        tokens = sum(s["tokens"] for s in manifest["splits"].values())
        json.dump({"tokens": tokens, "seconds": time.perf_counter() - t0}, open(report, "w"))
""")


def make_inputs(work: Path) -> tuple[Path, Path]:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from featcache.bundled import minilm_path

    model, data = work / "model", work / "data"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=256, max_position_embeddings=128)).save_pretrained(model)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(model)
    rng = random.Random(0)
    data.mkdir()
    for split, n in (("train", ROWS), ("dev", ROWS // 5)):
        rows = []
        for _ in range(n):
            y = rng.randrange(3)
            words = [rng.choice(WORDS[y * 8:(y + 1) * 8]) if rng.random() < 0.7 else rng.choice(WORDS)
                     for _ in range(rng.randint(8, 40))]
            rows.append(f"{' '.join(words)}\tc{y}")
        (data / f"{split}.tsv").write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    return model, data


def extraction(model: Path, data: Path, work: Path, ranks: int) -> dict:
    script, report = work / "extract.py", work / f"extract{ranks}.json"
    script.write_text(EXTRACT)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", str(ranks), str(script), str(model),
                    str(data), str(work / f"store{ranks}"), str(report)], env=env, check=True,
                   capture_output=True)
    got = json.loads(report.read_text())
    return {"ranks": ranks, **got, "tokens_per_s": got["tokens"] / got["seconds"]}


def sweep(store: Path, out: Path, workers: int, storage: str | None) -> dict:
    from sidetrain.search.sweep import SweepConfig, run_sweep

    t0 = time.perf_counter()
    summary = run_sweep(SweepConfig(store=str(store), out=str(out), trials=TRIALS, workers=workers, prune=False,
                                    space=SPACE, storage=storage, study_name=out.name, device="cpu", threads=1,
                                    stack=1, seed=0))
    wall = time.perf_counter() - t0
    assert summary["finished"] == TRIALS, summary["counts"]
    return {"workers": workers, "trials": TRIALS, "seconds": wall, "trials_per_hour": TRIALS / wall * 3600}


def main() -> None:
    import pgserver

    setup_logging()
    results: dict = {"trials": TRIALS, "rows": ROWS, "sweeps": {}, "extraction": []}
    with tempfile.TemporaryDirectory(prefix="lst-scaleout-") as tmp:
        work = Path(tmp)
        model, data = make_inputs(work)
        for ranks in (1, 2):
            results["extraction"].append(extraction(model, data, work, ranks))
            log.info("extraction, %d rank(s): %.0f tokens/s", ranks, results["extraction"][-1]["tokens_per_s"])
        store = work / "store1"
        results["sweeps"]["sqlite"] = [sweep(store, work / f"sqlite{k}", k, None) for k in (1, 2)]
        if pgserver.binaries() is None:
            log.warning("no PostgreSQL server binaries: the PostgreSQL rows are skipped")
        else:
            with pgserver.postgres() as url:
                results["sweeps"]["postgresql"] = [sweep(store, work / f"pg{k}", k, url) for k in (1, 2)]
        for rows in results["sweeps"].values():
            log.info("%s", rows)
    ext = results["extraction"]
    setting = (f"Random-weight BERT (4 x 128, timing only), {ROWS} + {ROWS // 5} synthetic rows; {TRIALS} trials "
               "of a fixed space (3 epochs, pruning off, --stack 1), 1 thread per worker or rank. "
               f"The machine has {os.cpu_count()} cores, shared: 2 workers can at best double.")
    lines = ["# Scale-out on one machine: sweep workers and extraction ranks", "", setting, "",
             "| storage | 1 worker: trials / hour | 2 workers: trials / hour | 2 / 1 |", "|---|---:|---:|---:|"]
    for name, (one, two) in results["sweeps"].items():
        lines.append(f"| {name} | {one['trials_per_hour']:.0f} ({one['seconds']:.0f} s) | "
                     f"{two['trials_per_hour']:.0f} ({two['seconds']:.0f} s) | "
                     f"{two['trials_per_hour'] / one['trials_per_hour']:.2f}x |")
    lines += ["", "| extraction | tokens / s | seconds |", "|---|---:|---:|"]
    lines += [f"| {e['ranks']} rank(s) (torchrun) | {e['tokens_per_s']:.0f} | {e['seconds']:.1f} |" for e in ext]
    lines += ["", f"2 ranks / 1 rank: **{ext[1]['tokens_per_s'] / ext[0]['tokens_per_s']:.2f}x**.", ""]
    write_results("scaleout", results, "\n".join(lines), "python benchmarks/bench_scaleout.py")


if __name__ == "__main__":
    main()
