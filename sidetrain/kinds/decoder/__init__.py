"""The decoder-only kind of stage 2 (causal LMs: Llama, Qwen2, Mistral, GPT-2, ...), its train half: kind.py (the
TrainKind), model.py (the causal side network: the family's own blocks at 1/r width, gated ladders, the --top
gate on the last real token), recipe.py (cached or --online batches and the loss for the shared loop) and
pretrained.py (a run as one model, `lst predict` on raw text). The frozen causal backbone is stage 1's
(featcache/kinds/decoder/backbone.py).
"""

from .kind import DecoderTrainKind

TRAIN_KIND = DecoderTrainKind()  # named in the kind's registration (featcache/kinds/decoder/__init__.py)
