"""The text-encoder kind of stage 2 (BERT-family backbones), its train half. This folder holds kind.py (the
TrainKind), recipe.py (the side network's options, cached or --online batches and the loss for the shared
loop), prune.py (--init pruned), predict.py (lst predict on raw text) and stacked_model.py (the fused
stack of a stacked sweep). Shared parts: the side network itself (LadderSideNetwork,
sidetrain/networks/encoder_stack.py, also the vision-language kind's) on sidetrain/networks/ (ladders.py,
family.py, side_config.py); recipe helpers (sidetrain/recipe.py), live text (sidetrain/text_inputs.py),
Fisher scores (sidetrain/fisher.py); the frozen text encoder (featcache/text/backbone.py).
"""

from .kind import EncoderTrainKind

TRAIN_KIND = EncoderTrainKind()  # named in the kind's registration (featcache/kinds/encoder/__init__.py)
