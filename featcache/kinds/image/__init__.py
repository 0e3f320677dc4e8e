"""The image kind of store (image classification over a frozen image model). Stage 2: sidetrain/kinds/image/."""

from ..registry import register_kind
from .kind import ImageExtractKind

register_kind(ImageExtractKind(), train="sidetrain.kinds.image:TRAIN_KIND")
