"""What a model's tokens look like: norms per kind and layer, high-norm outliers, neighbour similarity, CLS attention.

High-norm artifacts (Darcet et al., 2024) live in the pre-norm residual stream: a few patch tokens, usually on
redundant background, whose norm is several times that of the others. Their norms make the distribution bimodal, so
the threshold is found from the data (see `outlier_threshold`); Darcet et al.'s fixed 150 for DINOv2-L/g is reported
next to it as a cross-check.
"""

from __future__ import annotations

from dataclasses import dataclass

import contextlib

import torch
import torch.nn.functional as F

from ..backbones import backbone
from ..backbones.attention import eager_attention

DARCET_THRESHOLD = 150.0


@dataclass
class Tokens:
    """One forward's worth of tokens for a batch. Block outputs are pre-norm, final features are normalized."""
    blocks: dict[int, torch.Tensor]  # block index -> (B, N, D) with prefix tokens
    final: torch.Tensor  # (B, N, D)
    num_cls: int
    num_reg: int
    grid: tuple[int, int]
    attention: torch.Tensor | None = None  # (B, L): class token -> patches in the last block, mean over heads

    @property
    def prefix(self) -> int:
        return self.num_cls + self.num_reg

    def kind(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Slice token kind 'patch' | 'cls' | 'reg' out of (B, N, ...) tensors."""
        return {"cls": x[:, :self.num_cls], "reg": x[:, self.num_cls:self.prefix], "patch": x[:, self.prefix:]}[kind]


@torch.no_grad()
def collect(model: torch.nn.Module, x: torch.Tensor, last: int = 4, class_attention: bool = False) -> Tokens:
    """Pre-norm outputs of the last `last` blocks and the final features, in one forward pass; with
    `class_attention`, also the class token's attention to the patches in the last block (None without a class
    token, e.g. SigLIP)."""
    family = backbone(model)
    depth = len(model.blocks)
    last = min(max(last, 2), depth)
    prefix, cls = family.num_prefix, int(family.has_class_token)
    seen: list[torch.Tensor] = []
    capture = contextlib.nullcontext()
    if class_attention and cls:
        capture = class_attention_of(family.attention(-1), prefix, seen)
    with capture:
        final, outputs = family.block_outputs(x, last)
    blocks = {depth - last + i: t for i, t in enumerate(outputs)}
    return Tokens(blocks, final, cls, family.num_registers, family.grid,
                  seen[0] if seen else None)


@contextlib.contextmanager
def class_attention_of(attention: torch.nn.Module, prefix: int, out: list):
    """While active, appends to `out` the class token's (row 0) attention weights on the patch tokens, averaged over
    heads: (B, L), rows sum to <= 1 (the rest goes to prefix tokens).

    Every timm attention module (ViT `Attention`, Eva `EvaAttention` / `AttentionRope`, RoPE applied or not) passes
    its softmax weights through `attn_drop` on its eager path, so an ordinary forward hook there reads them; the
    module runs eager for that forward only."""
    hook = attention.attn_drop.register_forward_hook(
        lambda module, args, weights: out.append(weights[:, :, 0, prefix:].mean(1)))
    try:
        with eager_attention(attention):
            yield
    finally:
        hook.remove()


def otsu(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold: the cut that maximizes the between-class variance of a 1-D sample."""
    v = values.float().flatten()
    lo, hi = v.min().item(), v.max().item()
    if hi <= lo:
        return hi
    hist = torch.histc(v, bins, lo, hi).double()
    centers = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    centers = (centers[:-1] + centers[1:]) / 2
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centers).cumsum(0) / w0.clamp(min=1e-12)
    m1 = ((hist * centers).sum() - (hist * centers).cumsum(0)) / w1.clamp(min=1e-12)
    between = w0 * w1 * (m0 - m1) ** 2
    k = int(between[:-1].argmax())
    return float((centers[k] + centers[k + 1]) / 2)


def outlier_threshold(norms: torch.Tensor, ratio: float = 2.0, max_fraction: float = 0.2) -> dict:
    """The documented rule for "high-norm token", per model, from its own patch-token norms.

    Otsu's cut on log(norm) splits the tokens in two classes. It is accepted as an artifact threshold only if the
    distribution really is bimodal in the way artifacts make it: the upper class's median norm is at least `ratio` x
    the lower class's, and the upper class holds at most `max_fraction` of the tokens. Otherwise there are no
    outliers (threshold = inf). Clean models give one mode; DINOv2-L/g, CLIP, DeiT-III give a small far-away mode.
    """
    logn = norms.float().flatten().clamp(min=1e-6).log()
    cut = otsu(logn)
    low, high = norms.flatten()[logn <= cut], norms.flatten()[logn > cut]
    low_med = low.median().item() if len(low) else float("nan")
    high_med = high.median().item() if len(high) else float("nan")
    fraction = len(high) / max(1, norms.numel())
    bimodal = len(high) > 0 and high_med >= ratio * low_med and fraction <= max_fraction
    return dict(threshold=float(torch.tensor(cut).exp()) if bimodal else float("inf"), bimodal=bool(bimodal),
                otsu_cut=float(torch.tensor(cut).exp()), low_median=low_med, high_median=high_med,
                high_fraction=fraction, rule=f"Otsu on log-norm; bimodal if upper median >= {ratio}x lower median "
                                             f"and upper class <= {max_fraction:.0%} of tokens")


def neighbour_cosine(patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, L, D) -> (B, L): cosine of each patch token to the mean of its 4-neighbours (edges: those present)."""
    b, _, d = patches.shape
    x = patches.float().view(b, *grid, d).permute(0, 3, 1, 2)
    kernel = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=x.dtype, device=x.device)
    total = F.conv2d(x.reshape(b * d, 1, *grid), kernel.view(1, 1, 3, 3), padding=1).view(b, d, *grid)
    count = F.conv2d(torch.ones(1, 1, *grid, device=x.device, dtype=x.dtype), kernel.view(1, 1, 3, 3), padding=1)
    neighbours = total / count
    return F.cosine_similarity(x, neighbours, dim=1).flatten(1)


def pca_basis(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, first three principal directions, and robust (1%, 99%) ranges of (L, D) patch features."""
    x = patches.float()
    mean = x.mean(0)
    _, _, v = torch.pca_lowrank(x - mean, q=3, center=False, niter=4)
    p = (x - mean) @ v[:, :3]
    return mean, v[:, :3], p.quantile(0.01, dim=0), p.quantile(0.99, dim=0)


def pca_rgb(patches: torch.Tensor, grid: tuple[int, int], basis=None) -> torch.Tensor:
    """(L, D) patch features -> (gh, gw, 3) in [0, 1]: the first three principal components as colours.
    Pass another model's `pca_basis` to colour two models' features in the same space."""
    mean, v, lo, hi = basis or pca_basis(patches)
    p = (patches.float() - mean) @ v
    return ((p - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1).view(*grid, 3)
