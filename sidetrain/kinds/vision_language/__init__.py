"""The vision-language kind of stage 2 (a text encoder's states per question + an image model's tokens per
image), its train half. This folder holds kind.py (the TrainKind), model.py (the visual embedding in front of
the encoder side stack), data.py (batches: text states with their image's tokens, cached or --online),
recipe.py (the recipe for the shared loop), probe.py (the question-only and image-only floors) and
predict.py (lst predict on (question, image file) pairs). Shared parts: LadderSideNetwork and the rest of
sidetrain/networks/, recipe helpers (sidetrain/recipe.py), live text (sidetrain/text_inputs.py), linear
probes (sidetrain/probe.py); the frozen backbones and images of stage 1 (featcache/text/, featcache/images/,
and this kind's own featcache/kinds/vision_language/).
"""

from .kind import VisionLanguageTrainKind

TRAIN_KIND = VisionLanguageTrainKind()  # named in the kind's registration (featcache/kinds/vision_language/__init__.py)
