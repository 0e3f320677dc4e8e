"""Options of `lst train`: one dataclass, whose fields carry the defaults and the help the CLI shows."""

from __future__ import annotations

from dataclasses import dataclass

from featcache.config import opt
from featcache.errors import TrainConfigError, expected

from . import metrics as M

TOPS = ("side", "last", "layers")  # --top: what the classifier reads (TrainConfig.top)
POOLINGS = ("auto", "mean", "cls", "pair")  # --pooling: how the side output is pooled for the head
TASK_SAMPLINGS = ("proportional", "uniform")  # --task-sampling: which task each batch of a multi-task run is
# Options that change where/how a run executes but not its result: a resumed run may differ in them.
RESUME_FREE = {"out", "device", "preload", "memory_budget", "prefetch", "resume", "compile"}


@dataclass(frozen=True)
class Schedule:
    """The learning-rate factor of each optimiser step: linear warm-up, then linear decay to 0 at the last step
    (`lst train` and a stacked search's members run this one rule)."""

    total: int  # optimiser steps of the run
    warmup: int  # of which warm-up

    def factor(self, step: int) -> float:
        """The peak learning rate's multiplier at `step` (0 from the last step on: nothing updates there)."""
        if step >= self.total:
            return 0.0
        if step < self.warmup:
            return (step + 1) / max(1, self.warmup)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


@dataclass
class TrainConfig:
    """Options of `lst train`; the resolved copy is written to RUN/config.json."""

    store: str | list[str] = opt(  # noqa: RUF009 (opt() is a field)
        help="A store written by `lst extract`. Several stores: one multi-task side network over them, each store a "
             "task (docs/multitask.md).")
    out: str = opt(help="Run folder: config.json, metrics.json, weights.")
    reduction_factor: int = opt(8, "Side width = backbone width / r.")
    layers: list[int] | None = opt(  # noqa: RUF009 (opt() is a field)
        None, "Backbone layers that feed ladders (layer dropping; hidden_states indices >= 1), e.g. '2,4,6' or "
              "'2-6'; 'all': every stored block.")
    epochs: int = opt(10, "Passes over the training split.")
    lr: float = opt(3e-3, "AdamW peak learning rate (paper: 3e-3 for LST).")
    batch_size: int = opt(32, "Examples per step.")
    weight_decay: float = opt(0.01, "AdamW decoupled weight decay.")
    warmup_steps: int = opt(-1, "Linear warmup steps; -1: the paper's 500, scaled down to 10% of the steps "
                                "on small data.")
    grad_clip: float = opt(1.0, "Max global gradient norm; 0 turns clipping off.")
    dropout: float = opt(0.1, "Side network hidden and head dropout.")
    attention_dropout: float = opt(0.0, "Side attention dropout; off by default: its random (B, heads, T, T) "
                                        "masks dominate a CPU step.")
    pooling: str = opt("auto", "How the side output is pooled for the head: mean over the tokens, cls (the first "
                               "token), pair (sentence pairs: each text's mean, their difference and product), or "
                               "auto: pair on a store of sentence pairs whose tokenizer marks the two texts, else "
                               "mean (RUN/config.json records which).")
    side_heads: int | None = opt(None, "Attention heads of the side blocks (default: the backbone's, as in "
                                       "the paper).")
    top: str = opt("side", "What the classifier reads. side: the pooled side output, up-projected to the backbone "
                           "width (LST). last: a learned gate between that and the backbone's own pooled last stored "
                           "layer, (1 - g) * side + g * backbone, g = sigmoid(z) starting at 0.88, so a run starts "
                           "near the linear probe and learns how much the side network adds (QST). layers: the same "
                           "gate over a learned softmax mix of every stored layer's pooled state (UniPT).")
    label_smoothing: float = opt(0.0, "Cross-entropy label smoothing (classification).")
    head: str = opt("lst", "lst (the side network) or probe (logistic regression on the mean-pooled last "
                           "stored layer: the floor to beat).")
    amp: str = opt("auto", "auto (bf16 autocast on CUDA, off on CPU), bf16 or off.")
    compile: bool = opt(False, "torch.compile the side network (pays compile time once per run).")
    seed: int = opt(0, "Seeds the initialisation, dropout and batch order: same seed, same losses.")
    data_seed: int | None = opt(None, "Seeds the batch order alone (default: --seed); stacked trials share their "
                                      "stack's.")
    device: str = opt("auto", "auto, cpu or cuda.")
    train_split: str = opt("train", "Split to train on.")
    eval_split: str | None = opt(None, "Split for model selection (default: the first of dev, validation, "
                                       "valid, val in the store).")
    metric: str | None = opt(None, "Model selection metric: accuracy, f1, f1_macro, matthews, pearson, spearman "
                                   "(default: GLUE's for a dataset folder named after a GLUE task, e.g. CoLA "
                                   "matthews, MRPC f1; else accuracy, or pearson for regression); generated "
                                   "text (--task generate stores): exact_match (default), bleu_1..bleu_4, cider.")
    online: bool = opt(False, "Recompute the activations with the live backbone (classic LST; the baseline).")
    preload: bool | None = opt(None, "--preload: copy each split into GPU memory on a GPU (when it fits "
                                     "--memory-budget), else into RAM; --no-preload: stream every split from the "
                                     "store. Default: on a GPU, hold a split there when it fits the budget, else "
                                     "stream it; on a CPU, read the store memory-mapped (page cache, not the run's "
                                     "memory) when it fits the budget, else stream it.")
    memory_budget: float | None = opt(None, "GiB of memory one split's stored states may take where the default "
                                            "policy would keep them (GPU memory, or RAM/page cache); larger "
                                            "splits are streamed (default: half of the free GPU memory or of the "
                                            "available RAM).")
    prefetch: bool | None = opt(None, "Read batches in a background thread (default: on a GPU, and on a CPU "
                                      "for a streamed split).")
    resume: bool = opt(True, "Continue the run in --out from RUN/checkpoint.pt when it holds one for the "
                             "same options.")
    max_steps: int = opt(0, "Stop after this many optimiser steps (0: no limit), e.g. for a quick smoke run.")
    task_sampling: str = opt("proportional", "Multi-task runs (several stores): the task of each batch, drawn in "
                                             "proportion to the tasks' training batches (proportional: every batch "
                                             "of every task once per epoch) or equally often (uniform: an epoch as "
                                             "long as the proportional one, small tasks repeated, large ones cut).")
    init: str = opt("random", "Side blocks start random, or 'pruned': backbone blocks pruned to 1/r by Fisher "
                              "information (scores cached beside the store).")
    eval_beams: int = opt(1, "Stores of generated targets (--task generate): beams of the beam search that generates "
                             "each evaluation split (1: greedy; the paper's captions: 5). More beams, slower epochs.")

    def __post_init__(self) -> None:
        if isinstance(self.store, (list, tuple)):  # several stores: a multi-task run; one: the plain run
            if not self.store:
                raise TrainConfigError(expected("at least one STORE", "none"))
            self.store = str(self.store[0]) if len(self.store) == 1 else [str(s) for s in self.store]
        if self.task_sampling not in TASK_SAMPLINGS:
            raise TrainConfigError(expected(f"--task-sampling one of {', '.join(TASK_SAMPLINGS)}", self.task_sampling))
        for flag, value, low in [("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                                 ("--reduction-factor", self.reduction_factor, 1)]:
            if value < low:
                raise TrainConfigError(expected(f"{flag} of at least {low}", value))
        if self.lr <= 0:
            raise TrainConfigError(expected("--lr above 0", self.lr))
        if self.pooling not in POOLINGS:
            raise TrainConfigError(expected(f"--pooling one of {', '.join(POOLINGS)}", self.pooling))
        if self.metric is not None and self.metric not in M.METRIC_NAMES:
            raise TrainConfigError(expected(f"--metric one of {sorted(M.METRIC_NAMES)}", self.metric))
        if self.side_heads is not None and self.side_heads < 1:
            raise TrainConfigError(expected("--side-heads of at least 1", self.side_heads))
        if self.init not in ("random", "pruned"):
            raise TrainConfigError(expected("--init random or pruned", self.init))
        if self.top not in TOPS:
            raise TrainConfigError(expected(f"--top one of {', '.join(TOPS)}", self.top))
        if not 0 <= self.label_smoothing < 1:
            raise TrainConfigError(expected("--label-smoothing in [0, 1)", self.label_smoothing))
        if self.head not in ("lst", "probe"):
            raise TrainConfigError(expected("--head lst or probe", self.head))
        if self.amp not in ("auto", "bf16", "off"):
            raise TrainConfigError(expected("--amp auto, bf16 or off", self.amp))
        if not 0 <= self.dropout < 1 or not 0 <= self.attention_dropout < 1:
            raise TrainConfigError(expected("--dropout in [0, 1)", (self.dropout, self.attention_dropout)))
        # reachable from the command line since the CLI is generated from these fields
        if self.grad_clip < 0:  # a negative norm would flip the gradients, silently
            raise TrainConfigError(expected("--grad-clip of at least 0 (0: off)", self.grad_clip))
        if self.memory_budget is not None and not self.memory_budget >= 0:  # also refuses NaN
            raise TrainConfigError(expected("--memory-budget of at least 0 GiB", self.memory_budget))
        if self.eval_beams < 1:
            raise TrainConfigError(expected("--eval-beams of at least 1 (1: greedy)", self.eval_beams))
        if self.max_steps < 0:
            raise TrainConfigError(expected("--max-steps of at least 0 (0: no limit)", self.max_steps))

    @property
    def stores(self) -> list[str]:
        """Every store of the run (one, or a multi-task run's several)."""
        return list(self.store) if isinstance(self.store, list) else [self.store]

    @property
    def multitask(self) -> bool:
        return isinstance(self.store, list)

    def schedule(self, steps_per_epoch: int) -> Schedule:
        """The run's steps (--epochs, capped by --max-steps) and warm-up (--warmup-steps; -1: the paper's 500,
        at most 10% of the steps)."""
        total = steps_per_epoch * self.epochs
        total = min(self.max_steps, total) if self.max_steps else total
        return Schedule(total, self.warmup_steps if self.warmup_steps >= 0 else min(500, total // 10))
