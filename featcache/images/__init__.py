"""Image datasets and image backbones, shared by every kind of store with an image part (image,
vision_language): listing and decoding images (datasets.py), the frozen image models (backbones.py),
decoding ahead of the forward (prefetch.py) and the image part they compute (part.py)."""
