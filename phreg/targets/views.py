"""Test-time-augmented views and their inverse: what turns a noisy teacher into a denoising target.

A *plan* is an int tensor (V, 3) of rows (dy, dx, flip) in patch units. View 0 is always (0, 0, 0), the image itself.
A view shifts the image by (dy, dx) patches, fills what comes in from outside the frame, then mirrors it if `flip`.
Because shifts are whole patches, every original patch lands exactly on a patch of the view, so the inverse on the
feature side is a pure index map: original cell (a, b) was seen by view v at row a + dy, column b + dx (mirrored if
flipped), if that is inside the grid. Averaging the views there cancels whatever the teacher ties to position.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def sample_plan(grid: tuple[int, int], num_views: int, max_shift: float, flip_p: float, rng: np.random.Generator,
                candidates: int = 64) -> torch.Tensor:
    """View 0 = identity; the others by farthest-point sampling from a random pool of shifts in
    [-round(f * grid), +round(f * grid)] per axis, each mirrored with probability `flip_p`."""
    my, mx = (round(max_shift * g) for g in grid)
    sy, sx = np.meshgrid(np.arange(-my, my + 1), np.arange(-mx, mx + 1), indexing="ij")
    shifts = np.stack([sy.ravel(), sx.ravel()], 1)
    pool = shifts[rng.permutation(len(shifts))[:candidates]].astype(np.float64)
    chosen = [np.zeros(2)]
    dist = np.linalg.norm(pool, axis=1)
    for _ in range(num_views - 1):
        pick = pool[int(np.argmax(dist))]
        chosen.append(pick)
        dist = np.minimum(dist, np.linalg.norm(pool - pick, axis=1))
    flips = (rng.random(num_views) < flip_p).astype(np.int64)
    flips[0] = 0
    plan = np.concatenate([np.stack(chosen).astype(np.int64), flips[:, None]], 1)
    return torch.from_numpy(plan)


def plan_sampler(grid: tuple[int, int], views) -> functools.partial:
    """A picklable `plan(rng=...)` for the data workers: `sample_plan` with the recipe's `views` settings."""
    return functools.partial(sample_plan, grid=grid, num_views=views.num, max_shift=views.max_shift, flip_p=views.flip,
                             candidates=views.candidates)


def make_views(images: torch.Tensor, plans: torch.Tensor, patch: int, fill: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images and (B, V, 3) plans -> (B*V, C, H, W) views, view-major within each image.

    One batched gather on the images' device: view pixel (r, c) shows source pixel (r - dy * p, c' - dx * p) with
    c' = W - 1 - c when the view is mirrored, else c, and `fill` (C,) where that is outside the image. Whole-patch
    shifts make this an exact pixel copy, with no affine matrices (a warp's matrix inverse syncs a GPU with the host
    every step) and nothing made on the CPU.
    """
    b, c, h, w = images.shape
    v, dev = plans.shape[1], images.device
    dy, dx, flip = plans.to(dev).reshape(b * v, 3).unbind(1)
    rows = torch.arange(h, device=dev) - dy[:, None] * patch  # (N, H) source row of each view row
    cols = torch.arange(w, device=dev).expand(b * v, w)
    cols = torch.where(flip[:, None].bool(), w - 1 - cols, cols) - dx[:, None] * patch  # (N, W) source column
    inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
    image = torch.arange(b, device=dev).repeat_interleave(v)[:, None, None, None]
    channel = torch.arange(c, device=dev)[None, :, None, None]
    views = images[image, channel, rows.clamp(0, h - 1)[:, None, :, None], cols.clamp(0, w - 1)[:, None, None, :]]
    return torch.where(inside, views, fill.to(dev, images.dtype).view(1, c, 1, 1))


def inverse_index(plans: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each view and original cell: the token index in the view that shows it, and whether it is in frame.

    Returns idx, seen: (B, V, gh*gw) long and bool.
    """
    gh, gw = grid
    a = torch.arange(gh, device=plans.device).view(1, 1, gh, 1)
    b = torch.arange(gw, device=plans.device).view(1, 1, 1, gw)
    dy, dx, flip = (plans[..., i, None, None] for i in range(3))
    row, col = a + dy, b + dx
    seen = (row >= 0) & (row < gh) & (col >= 0) & (col < gw)
    col = torch.where(flip.bool(), gw - 1 - col, col)
    idx = (row.clamp(0, gh - 1) * gw + col.clamp(0, gw - 1)).flatten(2)
    return idx, seen.flatten(2)


def merge_views(feats: torch.Tensor, plans: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B*V, L, D) per-view patch features -> (B, L, D) mean over the views that saw each cell, and the counts (B, L).

    Accumulates in float32 whatever the features' dtype.
    """
    b, v = plans.shape[:2]
    _, length, dim = feats.shape
    idx, seen = inverse_index(plans.to(feats.device), grid)
    per_view = feats.view(b, v, length, dim).gather(2, idx.unsqueeze(-1).expand(b, v, length, dim))
    count = seen.sum(1)
    total = (per_view.float() * seen.unsqueeze(-1)).sum(1)
    return total / count.unsqueeze(-1), count
