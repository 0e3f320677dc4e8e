"""The T5 (encoder-decoder) kind of stage 2, its train half: kind.py (the TrainKind), pretrained.py (a run as a
model: candidates scored or text generated with the backbone live) and predict.py (the library entry points
`lst predict` has used from the start). What it trains is shared with the vision-language kind over T5: the T5
side network (sidetrain/networks/t5.py: a side encoder and a side decoder with ladders from both backbone stacks),
its batches, recipe, Fisher-pruned init and decoding (sidetrain/t5/); the frozen T5 and its label texts are
featcache/text/t5.py.
"""

from .kind import Seq2SeqTrainKind

TRAIN_KIND = Seq2SeqTrainKind()  # named in the kind's registration (featcache/kinds/seq2seq/__init__.py)
