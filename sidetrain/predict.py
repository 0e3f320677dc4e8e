"""`lst predict RUN`: one label (or, for kinds that generate, one generated text) per raw text, from a
finished run or a saved model folder. The run's recorded store manifest names its kind; the kind's plug-in
rebuilds it as a `LadderModel` (sidetrain/pretrained.py, the same object the Python API gives), which runs
the backbone live (inference needs it; training never does) beside the side network and labels the texts.
"""

from __future__ import annotations

import json
from pathlib import Path

from featcache.errors import LstError, expected

from .kinds.registry import kind_for, kind_names
from .multitask import TASKS_DIR
from .pretrained import LadderModel, read_model_config


def task_run(run: str, task: str | None) -> str:
    """The run folder `lst predict RUN [--task NAME]` reads: a multi-task run's task folder (RUN/tasks/NAME; --task
    is required there), or RUN itself (a single-task run takes no --task)."""
    try:
        tasks = json.loads((Path(run) / "config.json").read_text()).get("tasks")
    except (OSError, ValueError, AttributeError):
        tasks = None  # not a run folder: read_model_config says so in one line
    if not isinstance(tasks, dict):
        if task is not None:
            raise LstError(expected("--task only for a multi-task run (`lst train STORE STORE ...`)",
                                    f"--task {task} for '{run}', a single-task run", "Drop --task."))
        return run
    names = ", ".join(tasks)
    if task is None:
        raise LstError(expected(f"--task NAME for the multi-task run '{run}' (tasks: {names})", "no --task"))
    if task not in tasks:
        raise LstError(expected(f"--task one of {names} (the tasks of '{run}')", f"--task {task}"))
    return str(Path(run) / TASKS_DIR / task)


def read_texts(path: str | Path) -> list[str]:
    """One example per line; a tab separates the two texts of a sentence pair. Empty lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise LstError(expected("a text file with one example per line", f"'{path}' (no such file)"))
    return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_inputs(run: str, paths: list[str]) -> list[str]:
    """`lst predict RUN INPUTS...`: the examples INPUTS hold. Text runs: the lines of each text file; kinds
    whose inputs are files themselves (images) take the paths as they are."""
    if not paths:
        return []
    if kind_for(read_model_config(run)["store_manifest"]).inputs_are_files:
        return list(paths)
    return [t for p in paths for t in read_texts(p)]


def predict_lines(run: str, texts: list[str], generate: bool = False, device: str = "auto",
                  num_beams: int = 1) -> list[str]:
    """One label (or generated text with `generate`: greedy, or beam search with `num_beams` > 1) per text; a tab
    splits the two texts of a pair."""
    config = read_model_config(run)  # a finished LST run, or a one-line LstError
    kind = kind_for(config["store_manifest"])
    if generate and not kind.generates:
        makers = [n for n in kind_names() if kind_for({"kind": n}).generates]
        raise LstError(f"Expected a run trained on a store of a kind that generates text ({', '.join(makers)}) "
                       f"for --generate. Got '{run}' (its store's kind is {kind.name}). Drop --generate.")
    if num_beams < 1 or (num_beams > 1 and not generate):
        raise LstError(expected("--num-beams of at least 1, with --generate", f"--num-beams {num_beams}"
                                f"{'' if generate else ' without --generate'}"))
    return LadderModel.from_pretrained(run, device=device).predict_lines(texts, generate, num_beams)


def read_examples(run: str, paths: list[str], texts: list[str], images: list[str]) -> list[str]:
    """Everything `lst predict RUN INPUTS... [--text T]... [--image PATH]...` asks about, as the lines
    `predict_lines` takes. A kind that needs an image per example (vision-language) builds them itself."""
    config = read_model_config(run)
    kind = kind_for(config["store_manifest"])
    if kind.needs_images:
        return kind.examples(config, list(paths), list(texts), list(images))
    if images:
        raise LstError(expected("--image only for a run on a vision-language store",
                                f"'{run}' (its store's kind is {kind.name})", "Drop --image."))
    return read_inputs(run, list(paths)) + list(texts)
