"""The search space of `lst sweep`: which TrainConfig fields a trial draws, and from what.

A space is a mapping from a TrainConfig field to one of
    0.01                               a fixed value (recorded, not searched)
    [4, 8, 16]                         a categorical choice
    {low: 1.0e-4, high: 1.0e-2, log: true}   a range (int when both bounds are ints, unless the field is float)
Kept layers are strings in `lst train --layers` syntax: ["all", "2,4,6", "4-6"].

The default space is built from the store: its kind's search facts (kinds/registry.py `SearchFacts`:
valid reduction factors, stored blocks) give the reduction factors and layer patterns.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featcache.errors import LstError, expected

from ..config import TrainConfig
from ..kinds.base import SearchFacts
from ..kinds.registry import kind_for

# TrainConfig fields that describe where and how a run executes, not the side network: never searched.
NOT_SEARCHABLE = {"store", "out", "device", "train_split", "eval_split", "metric", "online", "preload",
                  "prefetch", "resume", "compile", "amp", "max_steps", "task_sampling", "eval_beams"}
RANGE_KEYS = {"low", "high", "log", "step"}


class SpaceError(LstError):
    """The search space (file or default) is not usable."""


def known_parameters() -> dict[str, type]:
    """Searchable TrainConfig fields and their value type (read from the dataclass, so new fields such as
    `init` become searchable without touching this file)."""
    out: dict[str, type] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in NOT_SEARCHABLE or f.default is dataclasses.MISSING:
            continue
        if f.name == "layers":
            out[f.name] = str  # 'all', '2,4,6': parsed per trial
        elif f.default is None:  # an optional field: its type from the annotation ('int | None')
            out[f.name] = next((t for t in (int, float, bool) if t.__name__ in str(f.type)), str)
        else:
            out[f.name] = type(f.default)
    return out


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "fixed", "choice", "int", "float"
    value: Any = None  # fixed
    choices: tuple = ()  # choice
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None

    def to_json(self) -> dict[str, Any]:
        d = {"kind": self.kind}
        if self.kind == "fixed":
            d["value"] = self.value
        elif self.kind == "choice":
            d["choices"] = list(self.choices)
        else:
            d.update(low=self.low, high=self.high, log=self.log, step=self.step)
        return d


def _number(name: str, value: Any, want: type) -> float | int:
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise SpaceError(expected(f"a number for '{name}'", repr(value))) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpaceError(expected(f"a number for '{name}'", repr(value)))
    if want is int:
        if float(value) != int(value):
            raise SpaceError(expected(f"an integer for '{name}'", repr(value)))
        return int(value)
    return float(value)


def _coerce(name: str, value: Any, want: type) -> Any:
    if want in (int, float):
        return _number(name, value, want)
    if want is bool and not isinstance(value, bool):
        raise SpaceError(expected(f"true or false for '{name}'", repr(value)))
    if want is str:
        return str(value)
    return value


def parse_param(name: str, spec: Any) -> Param:
    known = known_parameters()
    if name not in known:
        raise SpaceError(expected(f"search parameters among {sorted(known)}", f"'{name}'",
                                  "Fix or remove that key in the space file."))
    want = known[name]
    if isinstance(spec, list):
        if not spec:
            raise SpaceError(expected(f"at least one choice for '{name}'", "an empty list []",
                                      "Give one or more values, or remove the key to use the default."))
        choices = tuple(dict.fromkeys(_coerce(name, v, want) for v in spec))
        return Param(name, "choice", choices=choices)
    if isinstance(spec, dict):
        unknown = set(spec) - RANGE_KEYS
        if unknown or not {"low", "high"} <= set(spec):
            raise SpaceError(expected(f"a range for '{name}' with keys low, high (and optional log, step)",
                                      f"keys {sorted(spec)}"))
        if want not in (int, float):
            raise SpaceError(expected(f"a list of choices for '{name}' (it is not numeric)", f"a range {spec}"))
        is_int = want is int or (isinstance(spec["low"], int) and isinstance(spec["high"], int)
                                 and want is not float)
        low, high = (_number(name, spec[k], int if is_int else float) for k in ("low", "high"))
        if low > high:
            raise SpaceError(expected(f"low <= high in the range of '{name}'", f"an empty range low={low}, high={high}",
                                      "Swap the bounds or fix the typo."))
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise SpaceError(expected(f"low > 0 for the log range of '{name}'", f"low={low}"))
        step = spec.get("step")
        if step is not None and log:
            raise SpaceError(expected(f"either log or step for '{name}' (Optuna cannot do both)", spec))
        if step is not None:
            step = _number(name, step, int if is_int else float)
            if step <= 0:
                raise SpaceError(expected(f"step > 0 for '{name}'", f"step={step}"))
        return Param(name, "int" if is_int else "float", low=low, high=high, log=log, step=step)
    return Param(name, "fixed", value=_coerce(name, spec, want))


def parse_space(raw: Any) -> dict[str, Param]:
    if not isinstance(raw, dict):
        raise SpaceError(expected("a mapping of parameter -> values in the space file", type(raw).__name__))
    return {name: parse_param(name, spec) for name, spec in raw.items()}


def load_space_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping in a .yaml/.yml/.json space file."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(expected("a search space file (.yaml or .json)", f"'{path}' (no such file)"))
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text) or {}
    except Exception as err:  # noqa: BLE001 - json and yaml raise different types
        raise SpaceError(expected(f"valid {path.suffix.lstrip('.') or 'YAML'} in '{path}'",
                                  f"{type(err).__name__}: {str(err).splitlines()[0]}")) from None


def parse_layer_spec(spec: str, blocks: list[int]) -> list[int] | None:
    """'all' -> None; '2,4,6' or '4-6' -> the listed hidden_states indices (checked against `blocks`)."""
    if spec.strip().lower() == "all":
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-")
                out += range(int(lo), int(hi) + 1)
            elif part:
                out.append(int(part))
    except ValueError:
        raise SpaceError(expected("layers like 'all', '2,4,6' or '4-6'", repr(spec))) from None
    bad = [x for x in out if x not in blocks]
    if bad or not out:
        raise SpaceError(expected(f"kept layers among the stored blocks {blocks}", f"'{spec}'",
                                  "Each layer choice must name stored block layers (1 = first block)."))
    return out


def layer_patterns(blocks: list[int]) -> list[str]:
    """Default kept-layer choices: all, every second, the top half, and the paper's drop pattern
    (blocks 0, 4, 8 dropped in T5-base: hidden_states 1, 5, 9)."""
    n = len(blocks)
    patterns = [blocks, blocks[n % 2 == 0::2] if n > 1 else blocks, blocks[n // 2:],
                [b for j, b in enumerate(blocks) if j % 4 != 0] or blocks]
    out = ["all"]
    for p in patterns[1:]:
        spec = ",".join(map(str, p))
        if p != blocks and spec not in out:
            out.append(spec)
    return out


def search_facts(manifest: dict[str, Any]) -> SearchFacts:
    return kind_for(manifest).search_facts(manifest)


def default_space(manifest: dict[str, Any]) -> dict[str, Any]:
    """A sensible space for this store, in the space-file format."""
    facts = search_facts(manifest)
    factors = [r for r in (4, 8, 16) if r in facts.reduction_factors] or list(facts.reduction_factors[:3])
    blocks = list(facts.blocks)
    return {"lr": {"low": 3e-4, "high": 1e-2, "log": True}, "reduction_factor": factors,
            "layers": layer_patterns(blocks), "batch_size": [16, 32, 64], "epochs": {"low": 3, "high": 10},
            "seed": 0}


def check_against_store(space: dict[str, Param], manifest: dict[str, Any]) -> None:
    """Refuse choices the store cannot train (before any trial runs, with the valid values)."""
    facts = search_facts(manifest)
    blocks = list(facts.blocks)
    for p in space.values():
        values = p.choices if p.kind == "choice" else (p.value,) if p.kind == "fixed" else ()
        if p.name == "layers":
            for v in values:
                parse_layer_spec(str(v), blocks)
        if p.name == "init" and set(values) - {"random", "pruned"}:
            raise SpaceError(expected("init values among random, pruned", sorted(set(values) - {"random", "pruned"})))
        if p.name == "reduction_factor":
            good = list(facts.reduction_factors)
            bad = [v for v in values if v not in good] if values else \
                [] if any(p.low <= r <= p.high for r in good) else [f"{p.low}..{p.high}"]
            if bad:
                raise SpaceError(expected(f"reduction factors that {facts.reduction_rule}", bad,
                                          f"Use some of {good}."))


def resolve_space(manifest: dict[str, Any], raw: dict[str, Any] | None) -> dict[str, Param]:
    """Default space, overridden key by key by the user's, checked against the store."""
    merged = default_space(manifest)
    merged.update(raw or {})
    space = parse_space(merged)
    check_against_store(space, manifest)
    return space


def suggest(trial, space: dict[str, Param]) -> dict[str, Any]:
    """Draw one trial's settings (fixed ones included) from an Optuna trial."""
    values: dict[str, Any] = {}
    for p in space.values():
        if p.kind == "fixed":
            values[p.name] = p.value
        elif p.kind == "choice":
            values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.kind == "int":
            values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            values[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
    return values


def to_train_kwargs(values: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(values)
    if "layers" in kwargs:
        kwargs["layers"] = parse_layer_spec(str(kwargs["layers"]), list(search_facts(manifest).blocks))
    return kwargs
