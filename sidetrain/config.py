"""Options of `lst train`: one dataclass, whose fields carry the defaults and the help the CLI shows."""

from __future__ import annotations

from dataclasses import dataclass

from featcache.errors import TrainConfigError, expected

from . import metrics as M


@dataclass
class TrainConfig:
    """Options of `lst train`; the resolved copy is written to RUN/config.json."""

    store: str
    out: str
    reduction_factor: int = 8  # side width = backbone width / r
    layers: list[int] | None = None  # kept ladders (hidden_states indices >= 1); None = every stored block
    epochs: int = 10  # passes over the training split
    lr: float = 3e-3  # AdamW peak learning rate (paper: 3e-3 for LST)
    batch_size: int = 32  # examples per step
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    warmup_steps: int = -1  # -1: the paper's 500, scaled down to 10% of the steps on small data
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    dropout: float = 0.1  # side network hidden and head dropout
    attention_dropout: float = 0.0  # off by default: its random (B, heads, T, T) masks dominate a CPU step
    pooling: str = "mean"  # mean | cls: how the side output is pooled for the head
    side_heads: int | None = None  # attention heads of the side blocks; None = the backbone's (paper)
    head: str = "lst"  # lst (the side network) | probe (logistic regression on the last stored layer)
    amp: str = "auto"  # auto (bf16 autocast on CUDA, off on CPU) | bf16 | off
    compile: bool = False  # torch.compile the side network (pays compile time once per run)
    seed: int = 0  # seeds the initialisation, dropout and batch order: same seed, same losses
    device: str = "auto"  # auto, cpu or cuda
    train_split: str = "train"
    eval_split: str | None = None  # None: the first of dev/validation/valid/val in the store
    metric: str | None = None  # selection metric; None: GLUE's for a GLUE task folder, else accuracy / pearson
    online: bool = False  # recompute the activations with the live backbone (classic LST, the baseline)
    preload: bool | None = None  # keep splits in memory (GPU memory on a GPU, else RAM); None: when they fit
    prefetch: bool | None = None  # read batches in a background thread; None: unless preloaded on a CPU
    resume: bool = True  # continue from RUN/checkpoint.pt when --out holds one for the same options
    max_steps: int = 0  # 0: no limit (tests use it to pin short runs)
    init: str = "random"  # random | pruned: side blocks start as Fisher-pruned backbone blocks (cached scores)

    def __post_init__(self) -> None:
        for flag, value, low in [("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                                 ("--reduction-factor", self.reduction_factor, 1)]:
            if value < low:
                raise TrainConfigError(expected(f"{flag} of at least {low}", value))
        if self.lr <= 0:
            raise TrainConfigError(expected("--lr above 0", self.lr))
        if self.pooling not in ("mean", "cls"):
            raise TrainConfigError(expected("--pooling mean or cls", self.pooling))
        if self.metric is not None and self.metric not in M.METRICS:
            raise TrainConfigError(expected(f"--metric one of {sorted(M.METRICS)}", self.metric))
        if self.side_heads is not None and self.side_heads < 1:
            raise TrainConfigError(expected("--side-heads of at least 1", self.side_heads))
        if self.init not in ("random", "pruned"):
            raise TrainConfigError(expected("--init random or pruned", self.init))
        if self.head not in ("lst", "probe"):
            raise TrainConfigError(expected("--head lst or probe", self.head))
        if self.amp not in ("auto", "bf16", "off"):
            raise TrainConfigError(expected("--amp auto, bf16 or off", self.amp))
        if not 0 <= self.dropout < 1 or not 0 <= self.attention_dropout < 1:
            raise TrainConfigError(expected("--dropout in [0, 1)", (self.dropout, self.attention_dropout)))
