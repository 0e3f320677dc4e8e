"""README.md of a saved model (`LadderModel.save_pretrained`): what it is, its scores, and the commands that
made it (`lst extract`, `lst train`), rebuilt from the run's recorded options and, while it still exists,
its store's manifest."""

from __future__ import annotations

import dataclasses
from typing import Any

from featcache.config import ExtractConfig

from .config import TrainConfig

# Fields whose flag is not `--field-name`, or that the command line does not take.
EXTRACT_FLAGS = {"splits": "--split", "out": "--out"}
TRAIN_FLAGS = {"out": "--out"}
SKIP = {"store", "model", "dataset", "device", "overwrite", "dry_run", "resume"}


def command_line(command: str, cls: type, values: dict[str, Any], positional: list[str],
                 flags: dict[str, str]) -> str:
    """`lst COMMAND POSITIONAL... --flag value...`: the fields of `cls` in `values` that differ from their default."""
    parts = ["lst", command, *positional]
    for f in dataclasses.fields(cls):
        if f.name in SKIP or f.name not in values or f.metadata.get("library_only"):
            continue
        value, default = values[f.name], f.default if f.default is not dataclasses.MISSING else None
        if value == default and f.name != "out":
            continue
        flag = flags.get(f.name, "--" + f.name.replace("_", "-"))
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list) and f.name == "splits":
            parts += [f"{flag} {v}" for v in value]
        elif isinstance(value, list):
            parts.append(f"{flag} {','.join(map(str, value))}")
        elif value is not None:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def store_manifest(path: str) -> dict[str, Any] | None:
    """The full manifest of the run's store, when it is still there (it names the dataset and every option)."""
    try:
        from featcache.reader import open_store

        return open_store(path).manifest
    except Exception:  # noqa: BLE001 (moved, deleted or remote: the card says less, nothing fails)
        return None


def extract_command(config: dict[str, Any]) -> str:
    recorded = config["store_manifest"]
    full = store_manifest(config["store"]) or {}
    values = full.get("extract_config") or {}
    model = values.get("model") or recorded["backbone"]["name"]
    dataset = values.get("dataset") or (recorded.get("dataset") or {}).get("source") or "DATASET"
    if not values:  # no store to read: the recorded facts
        values = {"layers": recorded.get("layers"), "store_dtype": recorded.get("store_dtype"),
                  "precision": recorded.get("precision"), "max_length": recorded.get("max_length")}
    return command_line("extract", ExtractConfig, {**values, "out": config["store"]}, [str(model), str(dataset)],
                        EXTRACT_FLAGS)


def train_command(config: dict[str, Any]) -> str:
    return command_line("train", TrainConfig, config, [str(config["store"])], TRAIN_FLAGS)


def model_card(config: dict[str, Any], metrics: dict[str, Any] | None, kind: str, copied: list[str]) -> str:
    manifest = config["store_manifest"]
    task = manifest["task"]
    labels = task.get("label_names") or []
    backbones = [f"- {key}: `{manifest[key]['name']}` (weights {manifest[key].get('revision')})"
                 + (" — copied into this folder" if key in copied else "")
                 for key in ("backbone", "image_backbone") if key in manifest]
    lines = [
        "---", "library_name: lst", "tags: [ladder-side-tuning, lst]", "---", "",
        f"# LST side network ({kind} store)", "",
        ("A Ladder Side-Tuning side network trained by `lst train` from a feature store, beside its frozen "
         "backbone. Load it with `sidetrain.LadderModel.from_pretrained(THIS_FOLDER)` or label inputs with "
         "`lst predict THIS_FOLDER ...` (docs/python.md)."), "",
        "## Backbone", "", *backbones, "",
        "## Task", "",
        f"- {task['type']}" + (f", {len(labels)} labels: {', '.join(map(str, labels[:20]))}"
                               + (", ..." if len(labels) > 20 else "") if labels else ""),
        (f"- reduction factor {config.get('reduction_factor')}, kept layers {config.get('layers')}, "
         f"epochs {config.get('epochs')}, lr {config.get('lr')}, seed {config.get('seed')}"), "",
    ]
    if metrics:
        lines += ["## Metrics", "", (f"Best epoch picked on `{metrics.get('metric')}` of split "
                                     f"`{metrics.get('eval_split')}`."), "", "| split | metric | value |", "|---|---|---:|"]
        for split, scores in (metrics.get("splits") or {}).items():
            lines += [f"| {split} | {name} | {value:.4f} |" for name, value in scores.items()
                      if isinstance(value, (int, float))]
        lines += ["", (f"Trained in {metrics.get('train_seconds', 0):.1f} s ({metrics.get('mode')}), "
                       f"{metrics.get('trainable_parameters')} trainable parameters."), ""]
    lines += ["## How it was made", "", "```bash", extract_command(config), train_command(config), "```", ""]
    return "\n".join(lines)
