"""The encoder-decoder kind of store (T5, the paper's GLUE setting): what a store holds (kind.py: the shared
T5 text part, featcache/text/t5_part.py; the frozen T5 and its label texts: featcache/text/t5.py).
Stage 2: sidetrain/kinds/seq2seq/."""

from ..registry import register_kind
from .kind import Seq2SeqExtractKind

register_kind(Seq2SeqExtractKind(), train="sidetrain.kinds.seq2seq:TRAIN_KIND")
