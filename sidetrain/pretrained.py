"""A trained run as one model in Python (`LadderModel`): the frozen backbone(s) and the side network in one
`torch.nn.Module`, loaded from a run folder (`lst train --out RUN`) or a folder `save_pretrained` wrote.

    model = LadderModel.from_pretrained("runs/r8", device="cpu")    # the run's recorded backbone, live
    model.predict(["my card was declined"])                          # the labels `lst predict` prints
    out = model(**model.preprocess(["my card was declined"]))        # transformers' output object (logits, loss)
    model.save_pretrained("models/r8", copy_backbone=True)           # a self-contained folder
    pipe = model.pipeline()                                          # a transformers Pipeline of the kind's task

Each kind of store brings its own subclass (sidetrain/kinds/<kind>/pretrained.py), found through
`TrainKind.load_model`; this module holds what every kind shares: finding the folder's backbones, moving
devices and dtypes, saving, the label arithmetic and the pipeline.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from featcache.errors import LstError, expected
from featcache.loading import resolve_device
from featcache.manifest import compression_of

from .kinds.registry import kind_for, kind_names
from .run_files import BASES, RUN_FILES, read_bases, read_run_config, run_options

log = logging.getLogger(__name__)

SAVED_KEY = "lst_model"  # config.json of a saved folder: {"format", "copied", "saved_from"}
SAVED_FORMAT = 1
BACKBONE_KEYS = ("backbone", "image_backbone")  # manifest entries naming a frozen model (name, revision)
SAVED_NAMES = frozenset({*RUN_FILES, "metrics.json", "README.md", BASES, *BACKBONE_KEYS})  # what save_pretrained writes


def read_model_config(path: str | Path) -> dict[str, Any]:
    """config.json of a run folder or a saved model folder, its backbone names resolved: copies inside the
    folder become absolute paths. Anything else is a one-line LstError."""
    folder = Path(path)
    if not all((folder / name).is_file() for name in RUN_FILES):
        raise LstError(expected("a finished run folder or a folder LadderModel.save_pretrained wrote (config.json "
                                "and model.safetensors)", f"'{path}'", "Train one with `lst train STORE --out RUN`."))
    config = read_run_config(folder)
    if "store_manifest" not in config:
        raise LstError(expected("an lst run's config.json (with store_manifest)", f"'{folder / 'config.json'}'"))
    manifest = config["store_manifest"]
    for key in (config.get(SAVED_KEY) or {}).get("copied", []):
        manifest[key]["name"] = str((folder / manifest[key]["name"]).resolve())
    return config


class LadderModel(nn.Module):
    """A trained LST run: frozen backbone(s) + side network. Subclasses (one per kind) set `side` (the side
    network), register the frozen models as submodules, and fill in `preprocess`, `forward` and `logits`."""

    pipeline_task: str = ""  # the transformers task that fits the kind
    pipeline_tasks: tuple[str, ...] = ()  # every task `pipeline(task=...)` accepts for the kind
    input_modalities: tuple[str, ...] = ("text",)  # what transformers' pipelines read off a model
    output_modalities: tuple[str, ...] = ("text",)
    beam_search: bool = False  # generate(num_beams=) and `lst predict --num-beams` apply

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        super().__init__()
        self.source = Path(folder)
        self.run_config = config  # RUN/config.json, backbone names resolved
        self.options = run_options(config)  # the TrainConfig the run was trained with
        self.manifest = config["store_manifest"]
        self.kind = kind_for(self.manifest).name
        self.task = self.manifest["task"]
        self.label_names: list[str] = list(self.task.get("label_names") or [])

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, path: str | Path, backbone: str | None = None, image_backbone: str | None = None,
                        device: str | torch.device = "auto", dtype: torch.dtype | str | None = None) -> LadderModel:
        """The model of a run folder or a saved folder. `backbone` (and, for vision-language runs,
        `image_backbone`): a path to the same weights where the recorded one has moved (checked by hash)."""
        config = read_model_config(path)
        manifest = config["store_manifest"]
        for key, given in (("backbone", backbone), ("image_backbone", image_backbone)):
            if given is None:
                continue
            if key not in manifest:
                raise LstError(expected(f"{key}= only for a run that has one", f"a {kind_for(manifest).name} run"))
            manifest[key]["name"] = str(Path(given).resolve()) if Path(given).exists() else str(given)
        kind = kind_for(manifest)
        bases = read_bases(Path(path)) if compression_of(manifest) else None  # before any backbone loads
        model = kind.load_model(Path(path), config, resolve_device(str(device)))
        if bases is not None:
            model.project_live(bases)
        if dtype is not None:
            model.to(torch_dtype(dtype))
        return model.eval()

    def save_pretrained(self, out: str | Path, copy_backbone: bool = False) -> Path:
        """A self-contained folder: model.safetensors (the side network), config.json (the run's options and
        store facts), metrics.json, a model card (README.md) and, with `copy_backbone`, a copy of each local
        backbone folder (else its path is referenced). `lst predict` and `from_pretrained` read it."""
        from .model_card import model_card

        folder = prepare_model_dir(out)
        config = copy.deepcopy(self.run_config)
        manifest = config["store_manifest"]
        copied = []
        for key in BACKBONE_KEYS if copy_backbone else ():
            if key not in manifest:
                continue
            source = Path(manifest[key]["name"])
            if not source.is_dir():  # a bundled CNN or a hub id: referenced by name, not copied
                log.warning("%s '%s' is not a local folder: the saved model names it instead of copying it.",
                            key, source)
                continue
            if source.resolve() != (folder / key).resolve():
                shutil.rmtree(folder / key, ignore_errors=True)
                shutil.copytree(source, folder / key)
            manifest[key]["name"] = key
            copied.append(key)
        config[SAVED_KEY] = {"format": SAVED_FORMAT, "copied": copied, "saved_from": str(self.source.resolve())}
        metrics = self.metrics()
        weights = {k: v.detach().contiguous().cpu() for k, v in self.side.state_dict().items()}
        save_file(weights, str(folder / "model.safetensors"))
        if (self.source / BASES).is_file():  # a compressed store's bases: the saved model projects as the run did
            shutil.copyfile(self.source / BASES, folder / BASES)
        if metrics is not None:
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (folder / "README.md").write_text(model_card(config, metrics, self.kind, copied), encoding="utf-8")
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        return folder

    def metrics(self) -> dict[str, Any] | None:
        path = self.source / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else None

    # ------------------------------------------------------------------ devices and dtypes

    def frozen_parts(self) -> list[Any]:
        """The frozen backbone wrappers (featcache's Backbone / ImageBackbone), each with `.model`."""
        return []

    @property
    def device(self) -> torch.device:
        return next(self.side.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.side.parameters()).dtype

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        # the wrappers move their inputs to their recorded device and dtype: keep them in step with `.to()`
        for part in self.frozen_parts():
            first = next(iter(part.model.parameters()), None)
            if first is not None:
                part.device = first.device
                if hasattr(part, "dtype"):
                    part.dtype = first.dtype
        return self

    def train(self, mode: bool = True) -> LadderModel:
        """The backbones stay in eval mode (LST never trains them, and a cache could not hold dropout)."""
        super().train(mode)
        for part in self.frozen_parts():
            part.model.eval()
        return self

    def side_inputs(self, tensor: torch.Tensor) -> torch.Tensor:
        """Backbone states (float32) on the side network's device and dtype."""
        return tensor.to(self.device, self.dtype)

    # ------------------------------------------------------------------ labels

    def preprocess(self, examples: list) -> dict[str, torch.Tensor]:
        """The inputs `forward` takes for a few examples (padded), as transformers' processors give them."""
        raise NotImplementedError

    def logits(self, examples: list, batch_size: int = 32) -> np.ndarray:
        """(N, labels) float32 scores of every example (regression: (N, 1)), batched."""
        raise NotImplementedError

    def label_scores(self, examples: list, batch_size: int = 32) -> np.ndarray:
        """(N, labels) probabilities (softmax of `logits`); classification runs only."""
        self.check_classification()
        return torch.softmax(torch.from_numpy(self.logits(examples, batch_size)), dim=-1).numpy()

    def predict(self, examples: list, batch_size: int = 32) -> list[str]:
        """One label per example: the label names `lst predict` prints (regression: the score, 4 decimals)."""
        if not len(examples):
            return []
        scores = self.logits(list(examples), batch_size)
        if self.task["type"] == "regression":
            return [f"{x:.4f}" for x in scores[:, 0]]
        return [self.label_names[i] for i in scores.argmax(-1)]

    def predict_lines(self, lines: list[str], generate: bool = False, num_beams: int = 1) -> list[str]:
        """`lst predict`: one output per line as `sidetrain.predict` reads them (a tab splits a pair; a
        vision-language line is 'image path<TAB>question'). Kinds that generate override it."""
        self.check_beams(num_beams)
        if generate:
            self.generate()  # refuses in one line for kinds that do not generate
        return self.predict(lines)

    def check_beams(self, num_beams: int) -> None:
        """Beam search (`num_beams` > 1) only where the model has one (`beam_search`): one line otherwise."""
        if num_beams > 1 and not self.beam_search:
            raise LstError(expected("--num-beams only for T5 and VL-T5 runs (beam search over the side decoder)",
                                    f"a {self.kind} run", "Drop --num-beams (greedy)."))

    def can_generate(self) -> bool:
        return False

    def project_live(self, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A run trained on a compressed store: live states must be projected onto the store's bases, as the store
        holds them (`bases`: {part: (components, mean)}). Kinds that do it override this."""
        raise LstError(expected("a run on a full store for live inference with this kind (projecting live states "
                                "onto a compressed store's basis is built for encoder runs)",
                                f"a {self.kind} run trained on a compressed store ({compression_of(self.manifest).get('components')} "
                                "components per layer)", "Evaluate it with lst train's splits, or train on a full store."))

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        makers = [n for n in kind_names() if kind_for({"kind": n}).generates]
        raise LstError(expected(f"a run of a kind that generates text ({', '.join(makers)}) for generate()",
                                f"a {self.kind} run", "Use predict() for its labels."))

    def check_classification(self) -> None:
        if self.task["type"] != "classification":
            raise LstError(expected("a classification run for label scores", f"a {self.task['type']} run",
                                    "Use predict() or model(**inputs).logits."))

    def pipeline(self, task: str | None = None, **kwargs: Any):
        """A transformers Pipeline of the kind's task (`pipeline_task`), running this model."""
        from .pipelines import ladder_pipeline

        return ladder_pipeline(self, task or self.pipeline_task, **kwargs)


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in names:
        raise LstError(expected(f"dtype one of {sorted(names)} or a torch.dtype", repr(dtype)))
    return names[dtype]


def prepare_model_dir(out: str | Path) -> Path:
    """save_pretrained's folder: new, empty, or one save_pretrained wrote; anything else is refused (lst never
    overwrites what it did not write)."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise LstError(expected("a folder for save_pretrained", f"'{out}', a file"))
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in SAVED_NAMES)
        config = folder / "config.json"
        ours = config.is_file() and SAVED_KEY in json.loads(config.read_text() or "{}")
        if foreign or (any(folder.iterdir()) and not ours):
            shown = ", ".join(foreign[:3]) or "a run folder"
            raise LstError(expected("an empty folder or one LadderModel.save_pretrained wrote",
                                    f"'{out}' holding {shown}", "Choose another folder."))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def padded_text(ids: list[list[int]], types: list[list[int]], rows: list[int] | np.ndarray) -> dict[str, torch.Tensor]:
    """Token ids of examples `rows`, right-padded as transformers' tokenizers pad (0, mask 0): the text
    inputs of `forward` for the kinds whose text part is an encoder's (encoder, vision_language)."""
    from featcache.text.splits import pad_batch

    input_ids, mask = pad_batch([ids[i] for i in rows], 0)
    token_types, _ = pad_batch([types[i] for i in rows], 0)
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_types}


def text_lines(texts: list) -> list[str]:
    """Texts or (text, text) pairs as `lst predict` lines (a tab joins a pair)."""
    return ["\t".join(map(str, t)) if isinstance(t, (tuple, list)) else str(t) for t in texts]


def gather_rows(n: int, batches) -> np.ndarray:
    """(rows, scores) batches in any order -> one (n, C) float32 array in the examples' order."""
    out: np.ndarray | None = None
    for rows, scores in batches:
        if out is None:
            out = np.zeros((n, scores.shape[-1]), dtype=np.float32)
        out[rows] = scores
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)
