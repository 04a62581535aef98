"""Dense heads: how a model's patch features are read, for any family of `phreg.backbones`.

* `final`: the model's normalized output tokens (`forward_features`), as timm gives them.
* `last_block`: the last block's output before the final norm.
* `naclip` (Hajimiri et al., 2025): the last block is replaced by `X = norm1(x)`, per head
  `A = softmax(K K^T / sqrt(d_h) + Omega)` over all tokens, `out = attn.proj(A V)`, no residual, no MLP, then the
  final norm and projection head. `Omega_ij = exp(-|p_i - p_j|^2 / (2 sigma^2))` for patch cells i, j (grid units) and
  0 in every row and column of a prefix token (class, registers): a Gaussian neighbourhood prior on the patches.
* `maskclip` (Zhou et al., 2022): the last block is replaced by `out = attn.proj(V)` (attention with an identity
  matrix), no residual, no MLP, then the final norm and projection head.

PH-Reg reads a CLIP teacher through NACLIP and trains the student's MaskCLIP output. The family-specific parts (the
tokens entering the last block, q/k/v of its attention, the projection head) are hooks of a bound `Backbone`
handle (`backbone(model)`), which every function here takes; the head math is here, once. This module imports
nothing from the package's `__init__` (one direction: the families call the heads). All heads return patch tokens
only: prefix tokens take part in attention, never in the output.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..config.recipe import HEADS

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


def head_tokens(bb, x: torch.Tensor, head: str = "final", sigma: float = NACLIP_SIGMA) -> torch.Tensor:
    """Patch tokens (B, L, D) of `bb.model` on images `x` read through `head`; `bb` is a bound `Backbone`."""
    if head in ("final", "last_block"):
        return bb.patch_tokens(x, head)
    if head not in HEADS:
        raise ValueError(f"unknown dense head {head!r}; expected one of {', '.join(HEADS)}")
    tokens, ctx = bb.last_block_input(x)
    prefix = bb.num_prefix
    if head == "maskclip":  # identity attention: each output token is its own value; prefix tokens are not needed
        _, _, v = bb.last_block_qkv(tokens, ctx, need_qk=False)
        out = v[:, :, prefix:]
    else:
        grid = (x.shape[-2] // bb.patch_size, x.shape[-1] // bb.patch_size)
        _, k, v = bb.last_block_qkv(tokens, ctx)
        omega = gaussian_omega(grid, sigma, prefix, k.device, k.dtype)
        out = F.scaled_dot_product_attention(k, k, v, attn_mask=omega)[:, :, prefix:]  # softmax(KK^T/sqrt(d)+Omega)V
    return bb.project(bb.last_block_merge(out))


@torch.no_grad()
def head_dim(bb, head: str = "final") -> int:
    """Width of the features a head returns: the model's width, or its projection's (CLIP ViT-B/16: 768 vs 512)."""
    model = bb.model
    if head in ("final", "last_block"):
        return int(model.embed_dim)
    probe = next(model.parameters()).new_zeros(1, 1, model.embed_dim)
    return int(bb.project(probe).shape[-1])
