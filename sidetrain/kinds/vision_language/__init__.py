"""The vision-language kind of stage 2 (a text encoder's states per question + an image model's tokens per
image): side network (model.py), batches (data.py), the recipe for the shared loop (recipe.py), the floors
(probe.py), prediction on (question, image file) pairs (predict.py); kind.py plugs them in."""

from .kind import VisionLanguageTrainKind

TRAIN_KIND = VisionLanguageTrainKind()  # named in the kind's registration (featcache/kinds/vision_language/__init__.py)
