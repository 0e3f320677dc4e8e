"""`lst`: the command line. Thin: parse options, build a config, call featcache / sidetrain."""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Ladder Side-Tuning from a feature cache: `lst extract` runs the frozen backbone once, "
                       "`lst train` trains side networks from the stored activations, many times.")
console = Console(stderr=True)


class StoreDtype(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    int8 = "int8"


class Quoting(str, Enum):
    auto = "auto"
    csv = "csv"
    none = "none"


def user_errors(fn):
    """Turn the library's user-facing errors into one red line and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from rich.logging import RichHandler

        from featcache.errors import LstError

        # the console looks up sys.stderr at each write, so test runners that swap streams stay safe
        logging.basicConfig(level=logging.INFO, format="%(message)s", force=True,
                            handlers=[RichHandler(console=console, show_time=False, show_path=False)])
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            return fn(*args, **kwargs)
        except LstError as err:
            console.print(f"[red]Error:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("Interrupted. A store can be resumed by running the same command again.")
            raise typer.Exit(130) from None

    return wrapper


def parse_layers(spec: str | None) -> list[int] | None:
    """'all' or None -> None; '0,2,4-6' -> [0, 2, 4, 5, 6]."""
    from featcache.errors import LstError

    if spec is None or spec.strip().lower() == "all":
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-")
                out += range(int(lo), int(hi) + 1)
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise LstError(f"Expected --layers like 'all', '0,3,6' or '1-6'. Got '{spec}'.") from None
    return out


@app.command()
@user_errors
def extract(
    model: Annotated[str, typer.Argument(help="Backbone: a local model directory or a hub id.")],
    dataset: Annotated[str, typer.Argument(help="A csv/tsv/json/jsonl/parquet file, a folder of one file per "
                                                "split (train.tsv, dev.tsv, ...), or a datasets.save_to_disk folder.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Where to write the Zarr store (path or fsspec URL).")],
    split: Annotated[list[str] | None, typer.Option(help="Split to extract (repeatable). Default: all.")] = None,
    text_column: Annotated[str | None, typer.Option(help="Default: text, sentence, sentence1, ...")] = None,
    text_pair_column: Annotated[str | None, typer.Option(help="Second text of a pair (default: inferred).")] = None,
    label_column: Annotated[str | None, typer.Option(help="Default: label, score, ...")] = None,
    task: Annotated[str, typer.Option(help="auto, classification or regression.")] = "auto",
    max_length: Annotated[int, typer.Option(help="Tokens per example; longer texts are truncated and counted.")] = 128,
    layers: Annotated[str, typer.Option(help="hidden_states indices to store: 'all', '0,3,6', '0-4' "
                                             "(0 = embedding output).")] = "all",
    store_dtype: Annotated[StoreDtype, typer.Option(help="Storage dtype of the activations: fp32 (exact), fp16, "
                                                         "bf16, or int8 (one absmax scale per token and layer, ~1/4 "
                                                         "of fp32). The measured error of each is in the manifest.")]
    = StoreDtype.fp16,
    precision: Annotated[Precision, typer.Option(help="Compute precision of the backbone. int8: torch dynamic "
                                                      "quantisation on CPU, bitsandbytes on CUDA. Its measured drift "
                                                      "against fp32 is recorded in the manifest.")] = Precision.fp32,
    batch_size: Annotated[int, typer.Option(help="Examples per backbone forward.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quoting: Annotated[Quoting, typer.Option(help="Quote handling of csv/tsv files (auto picks per file).")]
    = Quoting.auto,
    header: Annotated[bool, typer.Option(help="Delimited files start with a header row.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store at --out.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the pre-flight summary (examples, tokens, "
                                                            "truncated, layers, bytes/token, store size, shards) "
                                                            "and exit without loading the backbone.")] = False,
    shard_tokens: Annotated[int, typer.Option(help="Tokens per shard, the unit of writing and resuming "
                                                   "(0: about 64 MiB per shard).")] = 0,
    error_sample: Annotated[int, typer.Option(help="Examples on which storage error and precision drift "
                                                   "are measured (0: skip).")] = 32,
    label_text: Annotated[str | None, typer.Option(help="Encoder-decoder (T5): JSON file mapping each label to its "
                                                        "target text (default: T5's GLUE words, else the label "
                                                        "names).")] = None,
) -> None:
    """Run the frozen backbone once over DATASET and store its per-layer activations.

    Re-running the same command on an interrupted store resumes it. Under `torchrun --nproc_per_node N`
    the N processes split the shards of one store between them.
    """
    from featcache import ExtractConfig
    from featcache import extract as run_extract

    cfg = ExtractConfig(model=model, dataset=dataset, out=out, splits=split or None, text_column=text_column,
                        text_pair_column=text_pair_column, label_column=label_column, task=task,
                        max_length=max_length, layers=parse_layers(layers), store_dtype=store_dtype.value,
                        precision=precision.value, batch_size=batch_size, device=device, overwrite=overwrite,
                        quoting=quoting.value, header=header, dry_run=dry_run, shard_tokens=shard_tokens,
                        error_sample=error_sample, label_text=label_text)
    if dry_run:
        _print_preflight(run_extract(cfg)["preflight"])
        return
    manifest = run_extract(cfg)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports for all
    rows = ", ".join(f"{n} {s['examples']:,}" for n, s in manifest["splits"].items())
    fidelity = manifest.get("fidelity") or {}
    error = fidelity.get("storage_error", {}).get(manifest["store_dtype"])
    measured = f" (measured storage error {error['rel_error']:.2%})" if error else ""
    console.print(f"Wrote {out}: {rows} examples, layers {manifest['layers']}, {manifest['store_dtype']}{measured}.")


def _print_preflight(summary: dict) -> None:
    table = Table(title="lst extract --dry-run")
    for column in ("split", "examples", "tokens", "truncated", "rejected rows", "shards"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, s in summary["splits"].items():
        table.add_row(name, *(f"{s[k]:,}" for k in ("examples", "tokens", "truncated", "rejected_rows", "shards")))
    Console().print(table)
    Console().print(f"layers {summary['layers']}  bytes/token {summary['bytes_per_token']:,}  "
                    f"store ~{summary['bytes'] / 2**20:,.1f} MiB  shards {summary['shards']} of "
                    f"{summary['shard_tokens']:,} tokens")


@app.command()
@user_errors
def train(
    store: Annotated[str, typer.Argument(help="A store written by `lst extract`.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Run folder: config.json, metrics.json, weights.")],
    reduction_factor: Annotated[int, typer.Option(help="Side width = backbone width / r.")] = 8,
    layers: Annotated[str, typer.Option(help="Backbone layers that feed ladders (layer dropping), e.g. '2,4,6'.")]
    = "all",
    epochs: Annotated[int, typer.Option()] = 10,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (paper: 3e-3 for LST).")] = 3e-3,
    batch_size: Annotated[int, typer.Option()] = 32,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    train_split: Annotated[str, typer.Option()] = "train",
    eval_split: Annotated[str | None, typer.Option(help="Default: dev or validation.")] = None,
    metric: Annotated[str | None, typer.Option(help="Model selection metric: accuracy, f1, f1_macro, matthews, "
                                                    "pearson, spearman (default: GLUE's for a dataset folder named "
                                                    "after a GLUE task, e.g. CoLA matthews, MRPC f1; else accuracy, "
                                                    "or pearson for regression).")] = None,
    online: Annotated[bool, typer.Option("--online", help="Recompute activations with the live backbone "
                                                          "(classic LST; the baseline).")] = False,
    head: Annotated[str, typer.Option(help="lst (side network) or probe (logistic regression on the "
                                           "mean-pooled last stored layer: the floor to beat).")] = "lst",
    side_heads: Annotated[int | None, typer.Option(help="Side attention heads (default: the backbone's).")] = None,
    dropout: Annotated[float, typer.Option(help="Side network dropout.")] = 0.1,
    attention_dropout: Annotated[float, typer.Option(help="Side attention dropout (costly on CPU).")] = 0.0,
    weight_decay: Annotated[float, typer.Option()] = 0.01,
    warmup_steps: Annotated[int, typer.Option(help="-1: min(500, 10% of the steps).")] = -1,
    pooling: Annotated[str, typer.Option(help="mean or cls.")] = "mean",
    amp: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA), bf16 or off.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the side network.")] = False,
    preload: Annotated[bool | None, typer.Option("--preload/--no-preload", help="Keep splits in memory: "
                                                 "GPU memory on a GPU, else RAM (default: when they fit).")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue the run in --out.")] = True,
    init: Annotated[str, typer.Option(help="Side blocks start random, or 'pruned': backbone blocks pruned to 1/r "
                                           "by Fisher information (scores cached beside the store).")] = "random",
) -> None:
    """Train an LST side network from the stored activations (no backbone needed)."""
    from sidetrain import TrainConfig
    from sidetrain import train as run_train

    kept = parse_layers(layers)
    cfg = TrainConfig(store=store, out=out, reduction_factor=reduction_factor, layers=kept, epochs=epochs, lr=lr,
                      batch_size=batch_size, seed=seed, device=device, train_split=train_split,
                      eval_split=eval_split, metric=metric, online=online, head=head, side_heads=side_heads,
                      dropout=dropout, attention_dropout=attention_dropout, weight_decay=weight_decay,
                      warmup_steps=warmup_steps, pooling=pooling, amp=amp, compile=compile, preload=preload,
                      resume=resume, init=init)
    summary = run_train(cfg)
    _print_results(summary, title=f"lst train ({summary['mode']})")


@app.command()
@user_errors
def sweep(
    target: Annotated[str, typer.Argument(help="A store written by `lst extract` (or, with --report, a sweep DIR).")],
    out: Annotated[str | None, typer.Option("--out", "-o", help="Sweep folder: study.db, trials/<n>/, summary, "
                                                                "best.")] = None,
    trials: Annotated[int, typer.Option(help="Finished trials the study should hold (re-running resumes).")] = 20,
    space: Annotated[Path | None, typer.Option(help="Search space, YAML or JSON (default: built from the store).")]
    = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage: an RDB URL or journal:///shared/file.log "
                                                     "(default: sqlite in --out).")] = None,
    study_name: Annotated[str | None, typer.Option(help="Default: the name of --out.")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes on this machine, joining one study.")] = 1,
    prune: Annotated[bool, typer.Option("--prune/--no-prune", help="Stop hopeless trials early (median rule).")]
    = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    metric: Annotated[str | None, typer.Option(help="Metric to maximise (default per task).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads per worker (default: cores / workers).")]
    = None,
    stack: Annotated[int, typer.Option(help="Train up to K trials in one pass over the data (they share the "
                                            "network shape and batches; lr differs).")] = 1,
    seed: Annotated[int | None, typer.Option(help="Seed the sampler (same seed, same store -> same trials on one "
                                                  "worker; default: unseeded).")] = None,
    report: Annotated[bool, typer.Option("--report", help="Reprint the results of the sweep in TARGET.")] = False,
) -> None:
    """Search side-network settings with Optuna; every trial reads the same store (no backbone)."""
    from sidetrain.search.report import load_summary, results_table
    from sidetrain.search.space import load_space_file
    from sidetrain.search.sweep import SweepConfig, run_sweep

    if report:
        summary = load_summary(target)
    else:
        if out is None:
            raise typer.BadParameter("--out is required (the sweep folder).")
        cfg = SweepConfig(store=target, out=out, trials=trials, space=load_space_file(space) if space else None,
                          storage=storage, study_name=study_name, workers=workers, prune=prune, device=device,
                          metric=metric, threads=threads, stack=stack, seed=seed)
        summary = run_sweep(cfg)
    Console().print(results_table(summary))
    best = summary.get("best") or {}
    Console().print(f"best: trial {best.get('number')} -> {summary.get('best_dir')}  summary: "
                    f"{Path(summary['plot'] or '').parent / 'summary.json' if summary.get('plot') else 'summary.json'}"
                    f"  plot: {summary.get('plot')}")


@app.command()
@user_errors
def predict(
    run: Annotated[str, typer.Argument(help="A run folder written by `lst train`.")],
    input: Annotated[str | None, typer.Argument(help="A text file, one example per line (pairs: text<TAB>text).")]
    = None,
    text: Annotated[list[str] | None, typer.Option("--text", help="A text to label (repeatable).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    generate: Annotated[bool, typer.Option("--generate", help="T5 runs: generate free text (greedy) instead of "
                                                              "scoring the label texts.")] = False,
) -> None:
    """Label raw text with a trained run: the backbone named in its store manifest + its side network."""
    from featcache.errors import LstError
    from sidetrain.kinds.encoder.predict import Predictor, read_texts
    from sidetrain.kinds.seq2seq.predict import is_seq2seq_run, predict_lines

    texts = (read_texts(input) if input else []) + list(text or [])
    if not texts:
        raise LstError("Expected INPUT (a text file) or --text. Got neither.")
    if is_seq2seq_run(run):  # T5: candidate scoring or generation, backbone live
        for t, out in zip(texts, predict_lines(run, texts, generate, device)):
            typer.echo(f"{out}\t{t}")
        return
    if generate:
        raise LstError(f"Expected a run trained on a T5 store for --generate. Got '{run}' (encoder-only). "
                       "Drop --generate.")
    predictor = Predictor(run, device)
    for t, label in zip(texts, predictor.label_names(predictor.predict(texts))):
        typer.echo(f"{label}\t{t}")


def _print_results(summary: dict, title: str, extra: dict[str, str] | None = None) -> None:
    Console().print(f"[bold]{title}[/bold]")  # a table title would wrap to the table's narrow width
    table = Table()
    table.add_column("split")
    table.add_column(summary["metric"], justify="right")
    for name, scores in summary["splits"].items():
        table.add_row(name, f"{scores[summary['metric']]:.4f}")
    Console().print(table)
    facts = {"train time": f"{summary['train_seconds']:.1f} s", "examples/s": f"{summary['examples_per_second']:,.0f}",
             "peak memory": f"{summary['peak_memory_bytes'] / 2**20:,.0f} MiB"}
    facts.update(extra or {})
    Console().print("  ".join(f"{k}: {v}" for k, v in facts.items()))


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the store and the run.")] = Path("lst-demo"),
    epochs: Annotated[int, typer.Option(help="8 keeps extraction + training near 5 minutes on 2 CPU cores.")] = 8,
    batch_size: Annotated[int, typer.Option()] = 32,
) -> None:
    """Extract the bundled MiniLM over banking77, train a side network from the cache, print results."""
    from featcache import ExtractConfig
    from featcache import extract as run_extract
    from featcache.bundled import bolt_dataset_path, minilm_path
    from sidetrain import TrainConfig
    from sidetrain import train as run_train

    store = out / "banking77.zarr"
    t0 = time.perf_counter()
    if not _complete_store(store):
        run_extract(ExtractConfig(model=str(minilm_path()), dataset=str(bolt_dataset_path("banking")),
                                  out=str(store), max_length=64, store_dtype="fp16", overwrite=store.exists()))
    extract_s = time.perf_counter() - t0
    summary = run_train(TrainConfig(store=str(store), out=str(out / "run"), epochs=epochs, batch_size=batch_size,
                                    resume=False))  # a re-run of the demo trains again
    size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    _print_results(summary, title="lst demo: MiniLM-L6 + banking77, LST from the cache",
                   extra={"extract": f"{extract_s:.1f} s", "store": f"{size / 2**20:,.0f} MiB"})


def _complete_store(path: Path) -> bool:
    from featcache import LstError, open_store

    try:
        open_store(path)
        return True
    except LstError:
        return False


class ExportFormat(str, Enum):
    hdf5 = "hdf5"


@app.command()
@user_errors
def inspect(
    store: Annotated[str, typer.Argument(help="A store written by `lst extract` (complete or not).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")] = False,
) -> None:
    """What a store holds: splits, tokens, layers, dtype, size, fingerprints, completeness, measured error."""
    import json

    from featcache.inspect import inspect_store, render

    info = inspect_store(store)
    if json_out:
        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        Console().print(render(info))


@app.command()
@user_errors
def export(
    store: Annotated[str, typer.Argument(help="A complete store written by `lst extract`.")],
    out: Annotated[Path, typer.Argument(help="The file to write, e.g. store.h5.")],
    format: Annotated[ExportFormat, typer.Option("--format", help="Output format.")] = ExportFormat.hdf5,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT file.")] = False,
) -> None:
    """Export a store to HDF5 (same arrays per split, manifest as JSON in the file's attributes)."""
    from featcache.hdf5 import export_hdf5

    path = export_hdf5(store, out, overwrite=overwrite, fmt=format.value)
    console.print(f"Wrote {path} ({path.stat().st_size / 2**20:,.1f} MiB).")


@app.command("import")
@user_errors
def import_(
    source: Annotated[Path, typer.Argument(help="An HDF5 file written by `lst export`.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Where to write the Zarr store (path or fsspec URL).")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store at --out.")] = False,
) -> None:
    """Rebuild a Zarr store from an HDF5 file written by `lst export`."""
    from featcache.hdf5 import import_hdf5

    manifest = import_hdf5(source, out, overwrite=overwrite)
    rows = ", ".join(f"{n} {s['examples']:,}" for n, s in manifest["splits"].items())
    console.print(f"Wrote {out}: {rows} examples, layers {manifest['layers']}, {manifest['store_dtype']}.")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
