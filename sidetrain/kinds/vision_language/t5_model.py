"""The VL-T5 side network (the paper's CLIP-T5; DESIGN.md 1b): the T5 side network (sidetrain/networks/t5.py)
whose side encoder reads the row's image tokens after the text.

    side encoder: [text ladders' stream ; VisualEmbedding(image tokens)]   # (B, T + k * V, d/r)
                  ladders zero-padded over the visual positions, T5's relative position bias between text
                  positions only (the backbone's T5 saw the text alone)
    side decoder: cross-attends to the whole side encoder output (text + visual), as in the text-only network;
                  its output is upsampled to d, scaled by d^-0.5 and fed to the frozen LM head.

VL-T5 projects image features to d, normalises, and downsamples with the text's embedding downsampler; here
one projection goes to d/r directly (a product of two linear maps is one linear map), then a LayerNorm.
"""

from __future__ import annotations

from typing import Any

import torch

from ...networks.t5 import T5LadderSideNetwork
from .model import VisualEmbedding


class VisionT5Side(T5LadderSideNetwork):
    """T5LadderSideNetwork's arguments, then the image tokens' width and count per image, and images per row."""

    def __init__(self, *args: Any, image_width: int, image_tokens: int, images: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        eps = float(self.config.layer_norm_epsilon)
        self.visual = VisualEmbedding(image_width, self.config.d_model, image_tokens, eps, images)

    def encode_with_image(self, enc_hidden: torch.Tensor, enc_mask: torch.Tensor,
                          image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """enc_hidden (B, T, n_stored, d), enc_mask (B, T) bool, image (B, k * V, n_image_layers, d_img)
        -> side encoder output (B, T + k * V, ds) and its mask."""
        visual = self.visual(image[:, :, -1].to(enc_hidden.dtype))
        out = self.encode(enc_hidden, enc_mask, appended=visual)
        real = torch.ones(visual.shape[:2], dtype=torch.bool, device=enc_mask.device)
        return out, torch.cat([enc_mask, real], dim=1)

    def side_encoding(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_with_image(batch.enc_hidden, batch.enc_mask, batch.image)

    def forward(self, enc_hidden: torch.Tensor, enc_mask: torch.Tensor, dec_hidden: torch.Tensor,
                dec_mask: torch.Tensor, row_example: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Decoder row n reads example row_example[n]'s text + image encoding -> states (N, U, d)."""
        enc_out, mask = self.encode_with_image(enc_hidden, enc_mask, image)
        return self.decode(dec_hidden, dec_mask, enc_out[row_example], mask[row_example])
