"""Images given to a loaded model (paths, encoded bytes, Pillow images or HxWx3 uint8 arrays), as the image
split stage 1 decodes: the same Pillow decoding and RGB conversion as at extraction. Shared by the kinds with an
image part (image, vision_language)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import LstError, expected
from featcache.images.datasets import ImageSplit


def as_image_split(images: list[Any], source: str = "the inputs") -> ImageSplit:
    """One ImageSplit row per image; in-memory images are encoded losslessly (PNG) so they take the path a file
    takes (RGBA on white, palette and grayscale to RGB)."""
    items: list[Path | bytes] = []
    where: list[str] = []
    for i, image in enumerate(images):
        if isinstance(image, (str, Path)):
            items.append(Path(image))
            where.append(str(image))
            continue
        if isinstance(image, bytes):
            items.append(image)
        elif isinstance(image, np.ndarray) or hasattr(image, "save"):
            items.append(png_bytes(image))
        else:
            raise LstError(expected("an image path, bytes, a PIL image or an HxWx3 uint8 array",
                                    f"{type(image).__name__} at position {i}"))
        where.append(f"image {i} of {source}")
    return ImageSplit("input", items, None, source, where)


def png_bytes(image: Any) -> bytes:
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
