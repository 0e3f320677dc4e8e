"""Stage 2 of lst: train Ladder Side-Tuning side networks from a feature store, without the backbone.

Public API: `train(TrainConfig(store=..., out=...))`; `sidetrain.predict.predict_lines(run, texts)` for
raw text. Each kind of store is a plug-in (`sidetrain.kinds.register_kind`, kinds/registry.py).
"""

from .config import TrainConfig
from .networks.encoder_stack import LadderSideNetwork
from .train import train

__all__ = ["LadderSideNetwork", "TrainConfig", "train"]
