"""Every user mistake and damaged input we know of, tried through the real CLI: exit code, the message,
and whether anything was lost. Writes benchmarks/results/bad_inputs.{json,md} (docs/reliability.md
shows the table). Run: python benchmarks/bad_inputs.py  (about a minute; tiny random BERT, no network)."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def invoke(*args) -> tuple[int, str]:
    from typer.testing import CliRunner

    from cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def message(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines()]
    start = next((i for i, ln in enumerate(lines) if ln.startswith(("Error:", "bad shard", "Usage:", "│ Error", "╭"))), None)
    if start is None:
        return lines[-1] if lines else ""
    text = " ".join(ln.strip("│╭╮╰╯─ ") for ln in lines[start:start + 4] if ln.strip("│╭╮╰╯─ "))
    return text[:300]


def tsv(path: Path, rows: list[tuple], header=("text", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


def main() -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from featcache import ExtractConfig, extract
    from featcache.bundled import minilm_path
    from featcache.hdf5 import export_hdf5
    from featcache.lease import writer_lease

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="lst-bad-"))
    model = work / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(model)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(model)
    rng = random.Random(0)
    words = ["card", "payment", "refund", "transfer", "account", "balance", "fee", "cash", "atm", "pin"]
    data = work / "data"
    for split, n in (("train", 60), ("dev", 20)):
        tsv(data / f"{split}.tsv", [(" ".join(rng.choices(words, k=5)), rng.choice("ab")) for _ in range(n)])
    store = work / "store"
    extract(ExtractConfig(model=str(model), dataset=str(data), out=str(store), max_length=12, device="cpu",
                          shard_tokens=64, chunk_tokens=16, error_sample=0))
    run = work / "run"
    assert invoke("train", store, "--out", run, "--epochs", 1, "--device", "cpu")[0] == 0
    mine = work / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (work / "a_file").write_text("a file")
    (work / "config_dir").mkdir()
    (work / "config_dir" / "config.json").write_text('{"my": "settings"}')

    def copy_store(name: str, damage: Callable[[Path], None]) -> Path:
        dst = work / name
        shutil.copytree(store, dst)
        damage(dst / "train" / "hidden" / "c" / "0" / "0" / "0")
        return dst

    def flip(p: Path) -> None:
        b = bytearray(p.read_bytes())
        b[40] ^= 1
        p.write_bytes(bytes(b))

    flipped, missing = copy_store("flipped", flip), copy_store("missing", Path.unlink)
    half = work / "half"
    (half / "train.tsv").parent.mkdir()
    tsv(half / "train.tsv", [("a b", "x")])
    tsv(half / "dev.tsv", [("c d",)], header=("text",))
    empty_label = tsv(work / "empty_label" / "train.tsv", [("a b", "x"), ("c d", " ")])
    (work / "empty").mkdir()
    (work / "emptyfile").mkdir()
    (work / "emptyfile" / "train.tsv").write_text("")
    (work / "incomplete").mkdir()
    h5 = work / "s.h5"
    export_hdf5(store, h5)
    space = work / "space.yaml"
    space.write_text("learning_rate: [0.1]\n")
    ex = ("extract", model, data, "--device", "cpu", "--max-length", 12)

    cases: list[tuple[str, tuple, Callable[[], bool] | None]] = [
        ("dataset path missing", ("extract", model, work / "nope", "--out", work / "o1"), None),
        ("dataset folder without split files", ("extract", model, work / "empty", "--out", work / "o2"), None),
        ("empty data file", ("extract", model, work / "emptyfile", "--out", work / "o3"), None),
        ("unknown --text-column", (*ex, "--text-column", "body", "--out", work / "o4"), None),
        ("label column in one split only", ("extract", model, half, "--out", work / "o5"), None),
        ("a row with an empty label", ("extract", model, empty_label.parent, "--out", work / "o6"), None),
        ("--layers with an empty item", (*ex, "--layers", "1,,2", "--out", work / "o7"), None),
        ("--layers out of range", (*ex, "--layers", "0,9", "--out", work / "o8"), None),
        ("--store-dtype not offered", (*ex, "--store-dtype", "int4", "--out", work / "o9"), None),
        ("--max-length 1", ("extract", model, data, "--max-length", 1, "--out", work / "o10"), None),
        ("--batch-size 0", (*ex, "--batch-size", 0, "--out", work / "o11"), None),
        ("model path missing", ("extract", work / "no-model", data, "--out", work / "o12"), None),
        ("model folder that is not a model", ("extract", work / "empty", data, "--out", work / "o13"), None),
        ("--out holds the user's files", (*ex, "--out", mine, "--overwrite"),
         lambda: (mine / "notes.txt").read_text() == "keep me"),
        ("--out is a file", (*ex, "--out", work / "a_file"), lambda: (work / "a_file").read_text() == "a file"),
        ("complete store, other options, no --overwrite", (*ex[:-1], 10, "--out", store),
         lambda: (store / "zarr.json").exists()),
        ("a second writer on the same store", (*ex, "--out", work / "leased"), None),
        ("train: store missing", ("train", work / "nope", "--out", work / "r1"), None),
        ("train: a folder that is not a store", ("train", mine, "--out", work / "r2"), None),
        ("train: an empty store (killed before its manifest)", ("train", work / "incomplete_zarr", "--out", work / "r3"),
         None),
        ("train: --reduction-factor that does not divide d", ("train", store, "--out", work / "r4",
                                                               "--reduction-factor", 7), None),
        ("train: --layers not stored", ("train", store, "--out", work / "r5", "--layers", "5"), None),
        ("train: regression metric on a classification store", ("train", store, "--out", work / "r6",
                                                                 "--metric", "pearson"), None),
        ("train: --init unknown", ("train", store, "--out", work / "r7", "--init", "fisher"), None),
        ("train: --eval-split unknown", ("train", store, "--out", work / "r8", "--eval-split", "val2"), None),
        ("train: --lr 0", ("train", store, "--out", work / "r9", "--lr", 0), None),
        ("train: --dropout 1.5", ("train", store, "--out", work / "r10", "--dropout", 1.5), None),
        ("train: --out holds the user's config.json", ("train", store, "--out", work / "config_dir"),
         lambda: json.loads((work / "config_dir" / "config.json").read_text()) == {"my": "settings"}),
        ("train: --out is a file", ("train", store, "--out", work / "a_file"),
         lambda: (work / "a_file").read_text() == "a file"),
        ("train: a shard with a flipped bit", ("train", flipped, "--out", work / "r11", "--preload"), None),
        ("train: a deleted shard file", ("train", missing, "--out", work / "r12", "--no-preload"), None),
        ("sweep: --trials 0", ("sweep", store, "--out", work / "sw1", "--trials", 0), None),
        ("sweep: unknown key in the space file", ("sweep", store, "--out", work / "sw2", "--space", space), None),
        ("sweep: --out holds the user's files", ("sweep", store, "--out", mine),
         lambda: (mine / "notes.txt").read_text() == "keep me"),
        ("predict: not a run folder", ("predict", mine, "--text", "hello"), None),
        ("predict: --generate on an encoder run", ("predict", run, "--text", "hello", "--generate"), None),
        ("predict: no input", ("predict", run), None),
        ("inspect: not a store", ("inspect", mine), None),
        ("inspect --verify: a damaged store", ("inspect", flipped, "--verify"), None),
        ("export: the file exists, no --overwrite", ("export", store, work / "a_file"),
         lambda: (work / "a_file").read_text() == "a file"),
        ("import: not an HDF5 file", ("import", work / "a_file", "--out", work / "i1"), None),
        ("import: onto a store, no --overwrite", ("import", h5, "--out", store), lambda: (store / "zarr.json").exists()),
        ("import: --out holds the user's files", ("import", h5, "--out", mine, "--overwrite"),
         lambda: (mine / "notes.txt").read_text() == "keep me"),
    ]
    import zarr

    zarr.open_group(str(work / "incomplete_zarr"), mode="a")
    rows = []
    for what, args, kept in cases:
        if what == "a second writer on the same store":
            with writer_lease(str(work / "leased")):
                code, out = invoke(*args)
        else:
            code, out = invoke(*args)
        rows.append({"case": what, "command": "lst " + " ".join(str(a).replace(str(work), "W") for a in args),
                     "exit": code, "message": message(out).replace(str(work), "W"),
                     "traceback": "Traceback" in out, "nothing_lost": None if kept is None else bool(kept())})
    os.environ.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_ENDPOINT_URL="http://127.0.0.1:9",
                      AWS_MAX_ATTEMPTS="1")
    for what, args in (("extract: object-store endpoint unreachable", (*ex, "--out", "s3://lst-x/store")),
                       ("train: object-store endpoint unreachable", ("train", "s3://lst-x/store", "--out", work / "r13"))):
        code, out = invoke(*args)
        rows.append({"case": what, "command": "lst " + " ".join(str(a).replace(str(work), "W") for a in args),
                     "exit": code, "message": message(out), "traceback": "Traceback" in out, "nothing_lost": None})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bad_inputs.json").write_text(json.dumps({"command": "python benchmarks/bad_inputs.py", "cases": rows},
                                                        indent=2))
    lines = ["| # | case | exit | message (W = the work folder) | traceback | nothing lost |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lost = "" if r["nothing_lost"] is None else ("yes" if r["nothing_lost"] else "**NO**")
        lines.append(f"| {i} | {r['case']} | {r['exit']} | {r['message'].replace('|', '/')} | "
                     f"{'**yes**' if r['traceback'] else 'no'} | {lost} |")
    (RESULTS / "bad_inputs.md").write_text("`python benchmarks/bad_inputs.py`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
