"""The vision-language kind of stage 2 (a text encoder's states per question + an image model's tokens per
image): side network (model.py), batches (data.py), the recipe for the shared loop (recipe.py), the floors
(probe.py), prediction on (question, image file) pairs (predict.py); kind.py plugs them in."""

from ..registry import register_kind
from .kind import VisionLanguageKind

register_kind("vision_language", VisionLanguageKind())
