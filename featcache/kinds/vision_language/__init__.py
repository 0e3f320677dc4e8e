"""The vision-language kind of store (the paper's CLIP-T5 setting with an encoder-only text backbone): question
rows and their distinct images (data.py), what a store holds (kind.py). Stage 2: sidetrain/kinds/vision_language/."""

from ..registry import register_kind
from .kind import VisionLanguageExtractKind

register_kind(VisionLanguageExtractKind(), train="sidetrain.kinds.vision_language:TRAIN_KIND")
