"""Dense heads: how a model's patch features are read, for any family phreg supports.

* `final`: the model's normalized output tokens (`forward_features`), as timm gives them.
* `last_block`: the last block's output before the final norm.
* `naclip` (Hajimiri et al., 2025): the last block is replaced by `X = norm1(x)`, per head
  `A = softmax(K K^T / sqrt(d_h) + Omega)` over all tokens, `out = attn.proj(A V)`, no residual, no MLP, then the
  final norm and projection head. `Omega_ij = exp(-|p_i - p_j|^2 / (2 sigma^2))` for patch cells i, j (grid units) and
  0 in every row and column of a prefix token (class, registers): a Gaussian neighbourhood prior on the patches.
* `maskclip` (Zhou et al., 2022): the last block is replaced by `out = attn.proj(V)` (attention with an identity
  matrix), no residual, no MLP, then the final norm and projection head.

PH-Reg reads a CLIP teacher through NACLIP and trains the student's MaskCLIP output. The family-specific parts (the
tokens entering the last block, q/k/v of its attention, the projection head) are `phreg.backbones.Backbone` hooks;
the head math is here, once. All heads return patch tokens only: prefix tokens take part in attention, never in the
output.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .recipe import HEADS  # noqa: F401  (final, last_block, naclip, maskclip)
NACLIP_SIGMA = 5.0


@functools.lru_cache(maxsize=16)
def _omega_cpu(grid: tuple[int, int], sigma: float, prefix: int) -> torch.Tensor:
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")
    cells = torch.stack([rows.flatten(), cols.flatten()], 1)
    patch = torch.exp(-torch.cdist(cells, cells).square() / (2 * sigma ** 2))
    return F.pad(patch, (prefix, 0, prefix, 0)).float()  # zero rows / columns for the prefix tokens


def gaussian_omega(grid: tuple[int, int], sigma: float = NACLIP_SIGMA, prefix: int = 0, device=None,
                   dtype=torch.float32) -> torch.Tensor:
    """NACLIP's additive attention prior (N, N), N = prefix + gh * gw, prefix tokens first (timm's order)."""
    return _omega_cpu(tuple(grid), float(sigma), int(prefix)).to(device=device, dtype=dtype)


def head_tokens(model, x: torch.Tensor, head: str = "final", sigma: float = NACLIP_SIGMA, family=None) -> torch.Tensor:
    """Patch tokens (B, L, D) of `model` on images `x` read through `head` (`family`: its Backbone, found if None)."""
    from .backbones import backbone

    bb = family or backbone(model)
    if head in ("final", "last_block"):
        return bb.patch_tokens(model, x, head)
    if head not in HEADS:
        raise ValueError(f"unknown dense head {head!r}; expected one of {', '.join(HEADS)}")
    tokens, ctx = bb.last_block_input(model, x)
    prefix = bb.num_prefix(model)
    if head == "maskclip":  # identity attention: each output token is its own value; prefix tokens are not needed
        _, _, v = bb.last_block_qkv(model, tokens, ctx, need_qk=False)
        out = v[:, :, prefix:]
    else:
        grid = (x.shape[-2] // bb.patch_size(model), x.shape[-1] // bb.patch_size(model))
        _, k, v = bb.last_block_qkv(model, tokens, ctx)
        omega = gaussian_omega(grid, sigma, prefix, k.device, k.dtype)
        out = F.scaled_dot_product_attention(k, k, v, attn_mask=omega)[:, :, prefix:]  # softmax(KK^T/sqrt(d)+Omega)V
    return bb.project(model, bb.last_block_merge(model, out))


@torch.no_grad()
def head_dim(model, head: str = "final") -> int:
    """Width of the features a head returns: the model's width, or its projection's (CLIP ViT-B/16: 768 vs 512)."""
    from .backbones import backbone

    if head in ("final", "last_block"):
        return int(model.embed_dim)
    probe = next(model.parameters()).new_zeros(1, 1, model.embed_dim)
    return int(backbone(model).project(model, probe).shape[-1])


def dense_features(model, images: torch.Tensor, head: str = "final", sigma: float = NACLIP_SIGMA) -> torch.Tensor:
    """Dense features (B, gh, gw, D) of any model phreg supports, plain or distilled, through a dense head.

    `images` are normalized (B, 3, H, W) at the model's input size. `head`: final | last_block | naclip | maskclip
    (see this module's docstring); `sigma` is NACLIP's neighbourhood width in patches.
    """
    from .backbones import backbone

    p = backbone(model).patch_size(model)
    tokens = head_tokens(model, images, head, sigma)
    return tokens.reshape(len(images), images.shape[-2] // p, images.shape[-1] // p, tokens.shape[-1])
