"""Stage 2 of lst: train Ladder Side-Tuning side networks from a feature store, without the backbone.

Public API: `train(TrainConfig(store=..., out=...))`; `LadderModel.from_pretrained(RUN)` for a trained run
as a torch module (predict, forward, save_pretrained, pipeline; docs/python.md);
`sidetrain.predict.predict_lines(run, texts)` for raw text. Each kind of store is a plug-in: its train half (a `TrainKind`, kinds/base.py) lives in
kinds/<name>/ and is registered once, with its stage-1 half, in featcache/kinds/<name>/__init__.py;
`kind_for(manifest)` (kinds/registry.py) finds it. Side-network pieces that several kinds share live in
networks/ (docs/kinds.md).
"""

from .config import TrainConfig
from .networks.encoder_stack import LadderSideNetwork
from .pretrained import LadderModel
from .train import train

__all__ = ["LadderModel", "LadderSideNetwork", "TrainConfig", "train"]
