"""`phreg.dense_features`: dense features of any model phreg supports, plain or distilled, through a dense head.

The heads themselves (final, last_block, naclip, maskclip) are defined beside the backbones they read, in
`phreg/backbones/heads.py`; this is the public entry point (`phreg.dense_features`).
"""

from __future__ import annotations

import torch

from .backbones import backbone
from .backbones.heads import NACLIP_SIGMA


def dense_features(model, images: torch.Tensor, head: str = "final", sigma: float = NACLIP_SIGMA) -> torch.Tensor:
    """Dense features (B, gh, gw, D) of any model phreg supports, plain or distilled, through a dense head.

    `images` are normalized (B, 3, H, W) at the model's input size. `head`: final | last_block | naclip | maskclip
    (see `phreg/backbones/heads.py`); `sigma` is NACLIP's neighbourhood width in patches.
    """
    bb = backbone(model)
    p = bb.patch_size
    tokens = bb.patch_tokens(images, head, sigma)
    return tokens.reshape(len(images), images.shape[-2] // p, images.shape[-1] // p, tokens.shape[-1])
