"""The TTA geometry: views, their exact inverse, and the averaging that cancels position-tied noise."""

import numpy as np
import pytest
import torch

from phreg.targets.views import inverse_index, make_views, merge_views, sample_plan


def plans_for(n: int, grid, num_views=10, max_shift=0.15, flip=0.5, seed=0) -> torch.Tensor:
    return torch.stack([sample_plan(grid, num_views, max_shift, flip, np.random.default_rng([seed, 0, i]))
                        for i in range(n)])


def patch_means(images: torch.Tensor, p: int) -> torch.Tensor:
    """A feature that depends on content only: each patch's mean pixel, (N, L, C)."""
    return images.unfold(2, p, p).unfold(3, p, p).mean((-1, -2)).flatten(2).transpose(1, 2)


def reference_views(images, plans, p, fill):
    """Plain slicing, no kornia: shift by whole patches into a filled canvas, then mirror."""
    b, c, h, w = images.shape
    out = []
    for i in range(b):
        for dy, dx, flip in plans[i].tolist():
            canvas = fill.view(c, 1, 1).expand(c, h, w).clone()
            ys, xs = dy * p, dx * p
            canvas[:, max(ys, 0):h + min(ys, 0), max(xs, 0):w + min(xs, 0)] = \
                images[i, :, max(-ys, 0):h - max(ys, 0), max(-xs, 0):w - max(xs, 0)]
            out.append(canvas.flip(-1) if flip else canvas)
    return torch.stack(out)


@pytest.mark.parametrize("grid,p", [((16, 16), 14), ((6, 9), 8)])
def test_views_match_plain_slicing(grid, p):
    images = torch.randn(3, 3, grid[0] * p, grid[1] * p)
    plans = plans_for(3, grid, max_shift=0.3)
    fill = torch.tensor([2.0, -1.0, 0.5])
    assert torch.equal(make_views(images, plans, p, fill), reference_views(images, plans, p, fill))


@pytest.mark.parametrize("grid,p", [((16, 16), 14), ((37, 37), 14), ((6, 9), 8)])
def test_denoised_content_feature_equals_original(grid, p):
    images = torch.randn(2, 3, grid[0] * p, grid[1] * p)
    plans = plans_for(2, grid, max_shift=0.3)
    views = make_views(images, plans, p, torch.full((3,), 7.0))  # a fill no real patch has
    merged, count = merge_views(patch_means(views, p), plans, grid)
    torch.testing.assert_close(merged, patch_means(images, p), atol=1e-6, rtol=0)
    assert count.min() >= 1 and count.max() <= plans.shape[1]


def test_position_tied_pattern_is_attenuated():
    grid, views_n = (16, 16), 10
    plans = plans_for(8, grid, num_views=views_n)
    pattern = torch.randn(1, grid[0] * grid[1], 32)  # the same noise at the same view position in every view
    merged, count = merge_views(pattern.expand(8 * views_n, -1, -1).contiguous(), plans, grid)
    ratio = (merged.std() / pattern.std()).item()
    assert ratio < 0.5, ratio  # ~1/sqrt(#distinct views); a broken inverse would leave it near 1
    # the un-merged view-0 pattern is untouched by a no-op plan
    ident = torch.zeros(1, 1, 3, dtype=torch.long)
    torch.testing.assert_close(merge_views(pattern, ident, grid)[0], pattern)


def test_plan_rules():
    grid = (16, 16)
    m = round(0.15 * 16)
    plans = plans_for(50, grid)
    assert torch.equal(plans[:, 0], torch.zeros(50, 3, dtype=torch.long))  # view 0 is the image itself
    assert plans[..., :2].abs().max() <= m and plans[..., :2].abs().max() == m
    assert set(plans[..., 2].unique().tolist()) == {0, 1}
    flips = plans[:, 1:, 2].float().mean().item()
    assert 0.35 < flips < 0.65
    for plan in plans:  # farthest-point sampling never repeats a shift while the pool has new ones
        assert len({tuple(s) for s in plan[:, :2].tolist()}) == plan.shape[0]


def test_farthest_point_sampling_spreads_views():
    grid, rng = (37, 37), np.random.default_rng(0)
    fps = sample_plan(grid, 10, 0.15, 0.0, rng, candidates=200)[:, :2].float()
    rand = torch.from_numpy(rng.integers(-6, 7, size=(10, 2))).float()

    def min_gap(s):
        d = torch.cdist(s, s) + torch.eye(len(s)) * 1e9
        return d.min().item()

    assert min_gap(fps) >= 3 and min_gap(fps) > min_gap(rand)


def test_same_seed_same_views():
    a = sample_plan((16, 16), 10, 0.15, 0.5, np.random.default_rng([3, 1, 7]))
    b = sample_plan((16, 16), 10, 0.15, 0.5, np.random.default_rng([3, 1, 7]))
    c = sample_plan((16, 16), 10, 0.15, 0.5, np.random.default_rng([4, 1, 7]))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_inverse_index_by_hand():
    # 2x3 grid, one view shifted right by one column and mirrored: original (0,0) lands at column 1, mirrored to 1.
    plans = torch.tensor([[[0, 0, 0], [0, 1, 1]]])
    idx, seen = inverse_index(plans, (2, 3))
    assert idx[0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert seen[0, 1].tolist() == [True, True, False, True, True, False]
    assert idx[0, 1].tolist()[:2] == [1, 0] and idx[0, 1].tolist()[3:5] == [4, 3]
