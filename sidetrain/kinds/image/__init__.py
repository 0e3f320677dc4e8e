"""The image kind of stage 2 (image classification from an image store): side networks (model.py), the recipe
for the shared loop (recipe.py), prediction on image files (predict.py); kind.py plugs them in."""

from .kind import ImageTrainKind

TRAIN_KIND = ImageTrainKind()  # named in the kind's registration (featcache/kinds/image/__init__.py)
