"""`lst`: the command line. Thin: parse options, build a config, call featcache / sidetrain."""

from __future__ import annotations

import dataclasses
import functools
import inspect as pyinspect  # `inspect` is also a command below
import logging
import os
import sys
import time
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

# The options' defaults and help live in these dataclasses; the commands below are generated from them.
from featcache.config import ExtractConfig
from sidetrain.config import TrainConfig
from sidetrain.search.config import SweepConfig

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


class TaskSampling(str, Enum):
    proportional = "proportional"
    uniform = "uniform"


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
        for chatty in ("botocore", "aiobotocore", "s3fs", "fsspec"):  # credential lookups are not news
            logging.getLogger(chatty).setLevel(logging.WARNING)
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # aiohttp's "Unclosed client session" at exit
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
    """'all' or None -> None; '0,2,4-6' -> [0, 2, 4, 5, 6]. Empty items ('1,,3', '1,') and ranges are refused."""
    from featcache.errors import LstError, expected

    if spec is None or spec.strip().lower() == "all":
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:  # a range; a leading '-' alone is a sign
                lo, hi = part.split("-")
                span = range(int(lo), int(hi) + 1)
                if not span:
                    raise ValueError(part)
                out += span
            else:
                out.append(int(part))  # '' (an empty item) raises too
    except ValueError:
        raise LstError(expected("--layers like 'all', '0,3,6' or '1-6'", f"'{spec}'")) from None
    return out


FIELD_DEFAULT = object()  # Flag.default: the field's own


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a config field differs on the command line from a plain `--field-name` option of the field's type."""

    decls: tuple[str, ...] = ()  # flag names, e.g. ("--out", "-o"); default: typer's, from the name
    argument: bool = False  # positional, in field order
    name: str = ""  # the parameter's name where it is not the field's (`--split` for splits)
    type: Any = None  # the CLI type where it is not the field's: an Enum of the choices, str for --layers
    parse: Callable[[Any], Any] | None = None  # CLI value (when given) -> field value
    default: Any = FIELD_DEFAULT  # the CLI default where the field has none (sweep's --out: --report)
    show_default: bool | str = True
    note: str = ""  # appended to the field's help: what only the command line has


def config_command(cls: type, **flags: Flag) -> Callable:
    """Give the decorated command one parameter per field of `cls` that is not library-only, with the field's
    default and help text (`flags` adjust a field's CLI shape). The command is called with a dict of the
    field values (parsed; ready for `cls(**opts)`) followed by its own parameters, which come last."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("library_only")]
    if unknown := set(flags) - {f.name for f in fields}:  # a typo or a library-only field: fail at import
        raise TypeError(f"config_command({cls.__name__}): no CLI field {sorted(unknown)}")
    shape = {f.name: flags.get(f.name, Flag()) for f in fields}

    def parameter(f: dataclasses.Field, flag: Flag) -> pyinspect.Parameter:
        default = f.default if flag.default is FIELD_DEFAULT else flag.default
        if isinstance(flag.type, type) and issubclass(flag.type, Enum) and default is not None:
            default = flag.type(default)  # typer shows and checks the choice
        help = " ".join(filter(None, (f.metadata.get("help", ""), flag.note)))
        info = (typer.Argument(help=help, show_default=flag.show_default) if flag.argument else
                typer.Option(*flag.decls, help=help, show_default=flag.show_default))
        return pyinspect.Parameter(flag.name or f.name, pyinspect.Parameter.KEYWORD_ONLY,
                                   annotation=Annotated[flag.type or hints[f.name], info],
                                   default=pyinspect.Parameter.empty if default is dataclasses.MISSING else default)

    def decorate(fn: Callable) -> Callable:
        own = list(pyinspect.signature(fn, eval_str=True).parameters.values())[1:]  # after `opts`

        def command(**values: Any) -> Any:
            opts = {}
            for name, flag in shape.items():
                value = values.pop(flag.name or name)
                value = value.value if isinstance(value, Enum) else value
                opts[name] = flag.parse(value) if flag.parse and value is not None else value
            return fn(opts, **values)

        # typer reads the parameters from the signature; keyword-only, so any default order is allowed
        command.__signature__ = pyinspect.Signature(
            [parameter(f, shape[f.name]) for f in fields] + [p.replace(kind=p.KEYWORD_ONLY) for p in own])
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(command, attr, getattr(fn, attr))
        return command

    return decorate


def _space_file(path: Path) -> dict:
    from sidetrain.search.space import load_space_file

    return load_space_file(path)


OUT = ("--out", "-o")
LAYERS = Flag(type=str | None, parse=parse_layers, show_default="all")


@app.command()
@user_errors
@config_command(ExtractConfig, model=Flag(argument=True), dataset=Flag(argument=True), out=Flag(decls=OUT),
                splits=Flag(name="split", parse=lambda v: list(v) or None), layers=LAYERS,
                store_dtype=Flag(type=StoreDtype), precision=Flag(type=Precision), quoting=Flag(type=Quoting),
                dry_run=Flag(decls=("--dry-run",)))
def extract(opts: dict) -> None:
    """Run the frozen backbone once over DATASET and store its per-layer activations.

    Re-running the same command on an interrupted store resumes it. Under `torchrun --nproc_per_node N`
    the N processes split the shards of one store between them.
    """
    from featcache import extract as run_extract

    cfg = ExtractConfig(**opts)
    if cfg.dry_run:
        _print_preflight(run_extract(cfg)["preflight"])
        return
    manifest = run_extract(cfg)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports for all
    rows = ", ".join(f"{n} {s['examples']:,}" for n, s in manifest["splits"].items())
    fidelity = manifest.get("fidelity") or {}
    error = fidelity.get("storage_error", {}).get(manifest["store_dtype"])
    measured = f" (measured storage error {error['rel_error']:.2%})" if error else ""
    compression = manifest.get("compression")
    kept = "" if not compression else (f", {compression['components']} PCA components per layer (explained variance "
                                       f"{min(v for p in compression['parts'].values() for v in p['explained_variance']):.1%}"
                                       "+)")
    console.print(f"Wrote {cfg.out}: {rows} examples, layers {manifest['layers']}, "
                  f"{manifest['store_dtype']}{measured}{kept}.")


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
    if summary.get("components"):
        Console().print(f"{summary['components']} PCA components per layer: "
                        f"{summary['uncompressed_bytes'] / max(summary['bytes'], 1):.1f}x smaller than the full states "
                        f"(~{summary['uncompressed_bytes'] / 2**20:,.1f} MiB)")


@app.command()
@user_errors
@config_command(TrainConfig, store=Flag(argument=True, type=list[str]), out=Flag(decls=OUT), layers=LAYERS,
                online=Flag(decls=("--online",)), compile=Flag(decls=("--compile",)),
                task_sampling=Flag(type=TaskSampling))  # STORE...: one store's list becomes the str (TrainConfig)
def train(opts: dict) -> None:
    """Train an LST side network from the stored activations (no backbone needed). Several STOREs: one multi-task
    side network, each store a task (RUN/tasks/<name>/: each task's run folder)."""
    from sidetrain import train as run_train

    summary = run_train(TrainConfig(**opts))
    _print_results(summary, title=f"lst train ({summary['mode']})")
    if summary.get("tasks"):
        _print_tasks(summary)


def _print_tasks(summary: dict) -> None:
    table = Table()
    for column in ("task", "metric", *(splits := sorted({s for t in summary["tasks"].values() for s in t["splits"]}))):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for name, t in summary["tasks"].items():
        table.add_row(name, t["metric"], *(f"{t['splits'][s][t['metric']]:.4f}" if s in t["splits"] else "-"
                                           for s in splits))
    Console().print(table)


@app.command()
@user_errors
@config_command(SweepConfig, store=Flag(argument=True, name="target", note="Or, with --report, a sweep folder."),
                out=Flag(decls=OUT, type=str | None, default=None, note="Required unless --report."),
                space=Flag(type=Path | None, parse=_space_file))
def sweep(
    opts: dict,
    report: Annotated[bool, typer.Option("--report", help="Reprint the results of the sweep in TARGET.")] = False,
) -> None:
    """Search side-network settings with Optuna; every trial reads the same store (no backbone)."""
    from sidetrain.search.report import load_summary, results_table
    from sidetrain.search.sweep import run_sweep

    if report:
        summary = load_summary(opts["store"])
    else:
        if opts["out"] is None:
            raise typer.BadParameter("--out is required (the sweep folder).")
        summary = run_sweep(SweepConfig(**opts))
    Console().print(results_table(summary))
    best = summary.get("best") or {}
    Console().print(f"best: trial {best.get('number')} -> {summary.get('best_dir')}  summary: "
                    f"{Path(summary['plot'] or '').parent / 'summary.json' if summary.get('plot') else 'summary.json'}"
                    f"  plot: {summary.get('plot')}")


@app.command()
@user_errors
def predict(
    run: Annotated[str, typer.Argument(help="A run folder written by `lst train`.")],
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Text files, one example per line (pairs: text<TAB>text); for a run on an image store, image files.")]
    = None,
    text: Annotated[list[str] | None, typer.Option("--text", help="A text to label (repeatable).")] = None,
    image: Annotated[list[str] | None, typer.Option(
        "--image", help="Vision-language runs: the image a --text question is about (one for all, or one per "
                        "--text). INPUTS are then rows files with the store's question and image columns.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    generate: Annotated[bool, typer.Option("--generate", help="T5 and VL-T5 runs: generate free text (greedy) "
                                                              "instead of scoring the label texts.")] = False,
    num_beams: Annotated[int, typer.Option("--num-beams", help="With --generate: beam search with this many beams "
                                                               "(1: greedy; the paper's captions: 5).")] = 1,
    task: Annotated[str | None, typer.Option("--task", help="Multi-task runs: which task's side network (a store's "
                                                            "name; RUN/tasks/NAME).")] = None,
) -> None:
    """Label raw text (or image files, for an image run) with a trained run: its backbone, live, + its side network."""
    from featcache.errors import LstError
    from sidetrain.predict import predict_lines, read_examples, task_run

    run = task_run(run, task)
    texts = read_examples(run, inputs or [], text or [], image or [])
    if not texts:
        raise LstError("Expected INPUTS (text files, or image files for an image run) or --text. Got neither.")
    for t, out in zip(texts, predict_lines(run, texts, generate, device, num_beams)):
        typer.echo(f"{out}\t{t}")


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


class DemoTask(str, Enum):
    banking77 = "banking77"
    vqa = "vqa"
    vl = "vl"


VQA_DEMO = {"train_images": 1000, "test_images": 200, "epochs": 10}  # benchmarks/results/vl.md: test 0.997
VL_DEMO = {"train_images": 300, "test_images": 100, "epochs": 20}  # the paper's VL epochs; docs/vision_language.md


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the store and the run.")] = Path("lst-demo"),
    task: Annotated[DemoTask, typer.Option(
        help="banking77: MiniLM-L6 over banking77 intent classification. vqa: MiniLM-L6 + EfficientNet-Lite0 over "
             f"easy-VQA ({VQA_DEMO['train_images']} training images (a tenth of them dev), "
             f"{VQA_DEMO['test_images']} test images), the vision-language side network beside the question-only "
             "probe (measured on 2 quiet CPU cores: 6 minutes in all, test accuracy 0.997 against the question-only "
             "probe's 0.66; docs/vision_language.md). vl: the paper's VL-T5 setting on SYNTHETIC stand-ins built from "
             "easy-VQA (VQA with generated answers, two-image statements for NLVR2, captions for COCO) as one "
             "multi-task model over a randomly initialised T5 (no T5 weights ship offline) + EfficientNet-Lite0, each "
             f"task beside its floors ({VL_DEMO['train_images']} training images by default).")] = DemoTask.banking77,
    epochs: Annotated[int | None, typer.Option(
        help=f"Default: 8 for banking77 (extraction + training near 5 minutes on 2 CPU cores), "
             f"{VQA_DEMO['epochs']} for vqa.")] = None,
    batch_size: Annotated[int, typer.Option(help=TrainConfig.__dataclass_fields__["batch_size"].metadata["help"])]
    = TrainConfig.batch_size,
    train_images: Annotated[int | None, typer.Option(
        help=f"--task vqa and vl: easy-VQA training images (of 4,000). Default: {VQA_DEMO['train_images']} for vqa, "
             f"{VL_DEMO['train_images']} for vl.")] = None,
    test_images: Annotated[int | None, typer.Option(
        help=f"--task vqa and vl: easy-VQA test images (of 1,000). Default: {VQA_DEMO['test_images']} for vqa, "
             f"{VL_DEMO['test_images']} for vl.")] = None,
) -> None:
    """Extract the bundled MiniLM over banking77 (or, with --task vqa, MiniLM + EfficientNet-Lite0 over easy-VQA),
    train a side network from the cache, print results."""
    sizes = VL_DEMO if task == DemoTask.vl else VQA_DEMO  # each image demo's own default subset
    train_images = sizes["train_images"] if train_images is None else train_images
    test_images = sizes["test_images"] if test_images is None else test_images
    if task == DemoTask.vqa:
        _vqa_demo(out, epochs or VQA_DEMO["epochs"], batch_size, train_images, test_images)
        return
    if task == DemoTask.vl:
        from vl_demo import vl_demo

        vl_demo(out, epochs or VL_DEMO["epochs"], batch_size, train_images, test_images, _print_results)
        return
    from featcache import extract as run_extract
    from featcache.bundled import bolt_dataset_path, minilm_path
    from sidetrain import train as run_train

    store = out / "banking77.zarr"
    t0 = time.perf_counter()
    if not _complete_store(store):
        run_extract(ExtractConfig(model=str(minilm_path()), dataset=str(bolt_dataset_path("banking")),
                                  out=str(store), max_length=64, store_dtype="fp16", overwrite=store.exists()))
    extract_s = time.perf_counter() - t0
    summary = run_train(TrainConfig(store=str(store), out=str(out / "run"), epochs=epochs or 8, batch_size=batch_size,
                                    resume=False))  # a re-run of the demo trains again
    size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    _print_results(summary, title="lst demo: MiniLM-L6 + banking77, LST from the cache",
                   extra={"extract": f"{extract_s:.1f} s", "store": f"{size / 2**20:,.0f} MiB"})


def _vqa_demo(out: Path, epochs: int, batch_size: int, train_images: int, test_images: int) -> None:
    """easy-VQA: the VL store (each image once), the VL side network, and the question-only probe floor."""
    from featcache import extract as run_extract
    from featcache.bundled import easy_vqa_dataset, minilm_path
    from sidetrain import train as run_train

    data = easy_vqa_dataset(out / f"easy-vqa-{train_images}-{test_images}", train_images, test_images)
    store = out / f"easy-vqa-{train_images}-{test_images}.zarr"
    t0 = time.perf_counter()
    if not _complete_store(store):
        run_extract(ExtractConfig(model=str(minilm_path()), dataset=str(data), image_model="efficientnet-lite0",
                                  out=str(store), max_length=32, store_dtype="fp16", overwrite=store.exists()))
    extract_s = time.perf_counter() - t0
    summary = run_train(TrainConfig(store=str(store), out=str(out / "vqa-run"), epochs=epochs, batch_size=batch_size,
                                    resume=False))
    probe = run_train(TrainConfig(store=str(store), out=str(out / "vqa-probe"), head="probe", resume=False))
    size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    floor = probe["splits"].get("test", next(iter(probe["splits"].values())))[summary["metric"]]
    _print_results(summary, title="lst demo --task vqa: MiniLM-L6 + EfficientNet-Lite0 + easy-VQA, LST from the cache",
                   extra={"question-only probe (test)": f"{floor:.4f}", "extract": f"{extract_s:.1f} s",
                          "store": f"{size / 2**20:,.0f} MiB"})


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
    verify: Annotated[bool, typer.Option("--verify", help="Check every written shard against the checksum its "
                                                          "writer recorded and name each bad one (exit 1 if any); "
                                                          "re-running the same `lst extract` recomputes them.")]
    = False,
) -> None:
    """What a store holds: splits, tokens, layers, dtype, size, fingerprints, completeness, measured error."""
    import json

    from featcache.inspect import inspect_store, render, verify_store

    info = inspect_store(store)
    report = verify_store(store) if verify else None
    if report is not None:
        info["verify"] = report
    if json_out:
        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        Console().print(render(info))
    if report is not None:
        for bad in report["bad"]:
            console.print(f"[red]bad shard[/red] {bad['part']} #{bad['shard']}: {bad['problem']}", highlight=False)
        for bad in report["bad_bases"]:
            console.print(f"[red]bad basis[/red] compression/{bad['part']}: {bad['problem']}", highlight=False)
        unchecked = f"; no checksums in {', '.join(report['without_checksums'])}" if report["without_checksums"] else ""
        console.print(f"verify: {report['checked']} shards checked, {len(report['bad'])} bad{unchecked}.")
        if report["bad"] or report["bad_bases"]:
            raise typer.Exit(1)


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
