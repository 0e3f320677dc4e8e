"""The T5 (encoder-decoder) path of stage 2: `lst train` hands over here when a store's manifest has a
`seq2seq` block. A side encoder with ladders from the backbone encoder and a side decoder with ladders
from the teacher-forced backbone decoder (model.py) train on teacher-forced cross-entropy of the target
text, and classification scores every candidate label text (train.py); side blocks may start as the
backbone's blocks pruned by Fisher information (prune.py); prediction on raw text runs the backbone live
(predict.py).
"""

from .model import T5LadderSideNetwork, sequence_scores, target_loss
from .predict import is_seq2seq_run, load_run, predict_lines, predict_texts
from .prune import fisher_path, fisher_scores, pruned_init
from .recipe import CachedSeq2Seq, build_seq2seq_model, open_decoder, seq2seq_recipe, store_weights

__all__ = [
    "CachedSeq2Seq",
    "T5LadderSideNetwork",
    "build_seq2seq_model",
    "fisher_path",
    "fisher_scores",
    "is_seq2seq_run",
    "load_run",
    "open_decoder",
    "predict_lines",
    "predict_texts",
    "pruned_init",
    "seq2seq_recipe",
    "sequence_scores",
    "store_weights",
    "target_loss",
]
