"""`phreg.dense_features`: dense features of any model phreg supports, plain or distilled, through a dense head.

The heads themselves (final, last_block, naclip, maskclip) are defined beside the backbones they read, in
`phreg/backbones/heads.py`; this is the public entry point (`phreg.dense_features`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .backbones import backbone
from .backbones.heads import NACLIP_SIGMA


def dense_features(model, images: torch.Tensor, head: str = "final", sigma: float = NACLIP_SIGMA,
                   ttr=None) -> torch.Tensor:
    """Dense features (B, gh, gw, D) of any model phreg supports, plain or distilled, through a dense head.

    `images` are normalized (B, 3, H, W) at the model's input size. `head`: final | last_block | naclip | maskclip
    (see `phreg/backbones/heads.py`); `sigma` is NACLIP's neighbourhood width in patches. `ttr`: read the model with
    test-time registers (`phreg.ttr`): a sidecar path, "find" (the neurons found on `images`), or the neurons
    themselves ({block: [unit, ...]} or what `find_register_neurons` returned). A model built with
    `add_test_time_registers` / `load_test_time_registers` needs none: it carries them.
    """
    if ttr is not None and str(ttr) != "none":
        from .ttr import add_test_time_registers, neurons_for

        neurons = neurons_for(ttr, model, images) if isinstance(ttr, (str, Path)) else ttr
        model = add_test_time_registers(model, neurons)  # shares the model's tensors: no copy
    bb = backbone(model)
    p = bb.patch_size
    tokens = bb.patch_tokens(images, head, sigma)
    return tokens.reshape(len(images), images.shape[-2] // p, images.shape[-1] // p, tokens.shape[-1])
