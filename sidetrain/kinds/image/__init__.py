"""The image kind of stage 2 (image classification from an image store), its train half. This folder holds
kind.py (the TrainKind), model.py (the side networks: a vision transformer's family blocks, or ViT blocks
over a CNN's grid cells), recipe.py (cached or --online batches and the loss for the shared loop) and
predict.py (lst predict on image files). Shared parts: sidetrain/networks/ (ladders.py, family.py's config
fields, side_config.py), recipe helpers (sidetrain/recipe.py); the frozen image models, image datasets and
decoding threads of stage 1 (featcache/images/).
"""

from .kind import ImageTrainKind

TRAIN_KIND = ImageTrainKind()  # named in the kind's registration (featcache/kinds/image/__init__.py)
