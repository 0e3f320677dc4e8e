"""The LST side network for a vision-language store (docs/vision_language.md; DESIGN.md 1b, after VL-T5's LST).

The text backbone saw the question only; the side network sees the image too, as a prefix of side tokens:

    v = LayerNorm(W_v x_img + b_v) + pos                  # VL-T5's visual_embedding, d_img -> d/r, per image token
    s = [v ; W_emb h_0 + b_emb]                           # image tokens, then the text's embedding ladder
    for j, i in enumerate(K):                             # kept text backbone layers
        s = mu_j * s + (1 - mu_j) * [0 ; W_j h_i + b_j]   # ladders zero-padded over the image positions
        s = SideBlock_j(s, mask)                          # the text family's block at width d/r
    out = Head(mean over valid image + text positions of LayerNorm(s))

Everything but the visual embedding is the encoder kind's LadderSideNetwork (its `prefix` hook).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ...networks.encoder_stack import LadderSideNetwork

if TYPE_CHECKING:
    from ...networks.side_config import SideConfig


class VisualEmbedding(nn.Module):
    """Cached image tokens (B, k * T, d_img) of k images per row -> side tokens (B, k * T, ds): each channel
    standardised by the training images' statistics, a projection, a LayerNorm, a learned position per token
    (VL-T5 adds box positions; here the tokens are a fixed grid, so one per cell) and, for k > 1, a learned
    image-order embedding (VL-T5's img_order_embedding: which of the row's images a token belongs to)."""

    def __init__(self, image_width: int, side_width: int, tokens: int, eps: float, images: int = 1) -> None:
        super().__init__()
        # set once from the training split (recipe.py); saved with the weights, so predict reads the same.
        # A CNN's concatenated stages differ in scale by orders of magnitude: unscaled, the largest drown the rest.
        self.register_buffer("mean", torch.zeros(image_width))
        self.register_buffer("std", torch.ones(image_width))
        self.proj = nn.Linear(image_width, side_width)
        self.norm = nn.LayerNorm(side_width, eps=eps)
        self.position = nn.Parameter(torch.zeros(1, tokens, side_width))
        nn.init.normal_(self.position, std=0.02)
        self.images = images
        if images > 1:  # one image: no order to tell (and runs of one image keep their weights' names)
            self.order = nn.Parameter(torch.zeros(images, 1, side_width))
            nn.init.normal_(self.order, std=0.02)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.proj((image - self.mean) / self.std))
        where = self.position if self.images == 1 else (self.position + self.order).reshape(1, -1, x.shape[-1])
        return x + where


class VisionLanguageSide(nn.Module):
    """The text LadderSideNetwork with the image tokens as its side prefix. `image_width`, `image_tokens`: the
    channels and the count of the cached image tokens; `side`: the text stream's options."""

    def __init__(self, backbone_config, image_width: int, image_tokens: int, side: SideConfig,
                 images: int = 1) -> None:
        super().__init__()
        self.text = LadderSideNetwork(backbone_config, side)
        self.kept_layers = self.text.kept_layers
        eps = float(getattr(backbone_config, "layer_norm_eps", 1e-12))
        self.visual = VisualEmbedding(image_width, self.text.config.hidden_size, image_tokens, eps, images)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, n_stored, d) text states, mask (B, L) bool, image (B, k * T, 1, d_img) -> (B, num_outputs)."""
        return self.text(hidden, mask, prefix=self.visual(image[:, :, -1]))
