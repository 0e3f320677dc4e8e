"""Stage 2 of lst: train Ladder Side-Tuning side networks from a feature store, without the backbone.

Public API: `train(TrainConfig(store=..., out=...))`; `sidetrain.predict.predict_lines(run, texts)` for
raw text. Each kind of store is a plug-in: its train half (a `TrainKind`, kinds/base.py) lives in
kinds/<name>/ and is registered once, with its stage-1 half, in featcache/kinds/<name>/__init__.py;
`kind_for(manifest)` (kinds/registry.py) finds it. Side-network pieces that several kinds share live in
networks/ (docs/kinds.md).
"""

from .config import TrainConfig
from .networks.encoder_stack import LadderSideNetwork
from .train import train

__all__ = ["LadderSideNetwork", "TrainConfig", "train"]
