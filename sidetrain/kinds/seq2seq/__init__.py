"""The T5 (encoder-decoder) kind of stage 2, its train half. A side encoder with ladders from the backbone
encoder and a side decoder with ladders from the teacher-forced backbone decoder (model.py) train on
teacher-forced cross-entropy of the target text, and classification scores every candidate label text
(recipe.py, batches in data.py); side blocks may start as the backbone's blocks pruned by Fisher
information (prune.py); prediction on raw text runs the backbone live (predict.py); kind.py is the
TrainKind. Shared parts: the ladders and SideConfig (sidetrain/networks/), recipe helpers
(sidetrain/recipe.py), Fisher scores (sidetrain/fisher.py); the frozen T5 and its label texts come from
this kind's stage-1 half (featcache/kinds/seq2seq/backbone.py).
"""

from .kind import Seq2SeqTrainKind

TRAIN_KIND = Seq2SeqTrainKind()  # named in the kind's registration (featcache/kinds/seq2seq/__init__.py)
