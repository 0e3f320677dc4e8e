"""The image kind of stage 2 (image classification from an image store): side networks (model.py), the recipe
for the shared loop (recipe.py), prediction on image files (predict.py); kind.py plugs them in."""

from ..registry import register_kind
from .kind import ImageKind

register_kind("image", ImageKind())
