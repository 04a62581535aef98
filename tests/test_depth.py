"""The depth probe: its metrics against values worked out by hand on tiny arrays, the head's bins and losses on cases
with a known answer, the depth file formats, and the probe itself on a synthetic set where depth is what the features
can see, against a constant-depth baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from phreg.errors import UsageError
from phreg.eval.depth import bins_to_depth, depth_errors, fit_depth, gradient_loss, mean_errors, sigloss, valid_pixels
from phreg.eval.inputs import read_depth
from phreg.eval.probe import cosine_warmup, poly


def test_depth_metrics_by_hand():
    gt = np.array([[1.0, 2.0], [4.0, 0.0]])
    pred = np.array([[1.0, 2.5], [2.0, 3.0]])
    e = depth_errors(gt, pred, gt > 0)  # ratios 1, 1.25, 2 (the unmeasured pixel is not scored)
    assert e["delta1"] == pytest.approx(1 / 3)  # 1.25 is not < 1.25
    assert e["delta2"] == pytest.approx(2 / 3) and e["delta3"] == pytest.approx(2 / 3)  # 2 > 1.25³ = 1.953
    assert e["abs_rel"] == pytest.approx((0 + 0.25 + 0.5) / 3)
    assert e["rmse"] == pytest.approx(math.sqrt((0 + 0.25 + 4) / 3))
    assert e["log10"] == pytest.approx((0 + 0.0969100 + 0.3010300) / 3, abs=1e-6)
    assert depth_errors(gt, pred, np.zeros_like(gt, bool)) is None


def test_metrics_are_averaged_over_images_as_the_paper_does():
    one, three = dict(delta1=1.0, delta2=1.0, delta3=1.0, abs_rel=0.1, rmse=1.0, log10=0.1), \
        dict(delta1=0.0, delta2=0.5, delta3=1.0, abs_rel=0.3, rmse=3.0, log10=0.3)
    m = mean_errors([one, None, three])  # an image without valid pixels does not count
    assert m["rmse"] == 2.0 and m["delta1"] == 0.5 and m["abs_rel"] == pytest.approx(0.2) and m["images_scored"] == 2


def test_scored_pixels_exclude_unmeasured_too_deep_and_outside_the_crop():
    gt = np.full((6, 8), 5.0)
    gt[0, 0], gt[1, 1], gt[2, 2] = 0.0, 0.0005, 12.0
    assert valid_pixels(gt, 10.0).sum() == 48 - 3
    assert valid_pixels(gt, 10.0, crop=(1, 5, 2, 7)).sum() == 4 * 5 - 1  # (2, 2) is too deep


def test_bins_expectation_by_hand():
    bins = np.linspace(0.001, 10, 256)
    flat = bins_to_depth(torch.zeros(1, 256, 2, 3), 10.0)
    assert flat.shape == (1, 1, 8, 12) and torch.allclose(flat, torch.tensor(bins.mean(), dtype=torch.float32))
    logits = torch.zeros(1, 256, 2, 2)
    logits[0, 200] = 5.0  # everywhere: bin 200 weighs 5.1, every other 0.1
    want = (0.1 * bins.sum() + 5.0 * bins[200]) / (0.1 * 256 + 5.0)
    assert torch.allclose(bins_to_depth(logits, 10.0), torch.tensor(want, dtype=torch.float32), atol=1e-5)


def test_sigloss_sees_only_scale_and_the_gradient_loss_only_structure():
    gt = torch.rand(2, 12, 12) * 4 + 1
    valid = torch.ones_like(gt, dtype=torch.bool)
    scaled = 2 * gt + 1e-3  # log(pred + eps) - log(gt + eps) = log 2 exactly
    assert sigloss(scaled, gt, valid).item() == pytest.approx(math.sqrt(0.15) * math.log(2), rel=1e-5)
    assert gradient_loss(scaled, gt, valid).item() == pytest.approx(0, abs=1e-5)  # a scale has no gradient
    bumped = gt.clone()
    bumped[:, 6, 6] *= 2  # one pixel off by log 2: in 4 pairs (2 apart) at full scale and at every 2nd pixel
    by_hand = 2 * 4 * math.log(2) * (1 / (2 * 144) + 1 / (2 * 36))  # 2 images; N = valid pixels at each scale
    assert gradient_loss(bumped, gt, valid).item() == pytest.approx(by_hand, rel=1e-2)
    assert sigloss(gt, gt, valid).item() == pytest.approx(0, abs=1e-4)


def test_the_schedules_follow_the_configs():
    assert poly(0, 100) == 1 and poly(50, 100) == pytest.approx(0.5 ** 0.9) and poly(100, 100) == 0
    # depth: 12,800 of 30,000 iterations warm up linearly from 0.001x, under a cosine that ends at 1e-8x
    assert cosine_warmup(0, 30_000) == pytest.approx(1e-3)
    assert cosine_warmup(6400, 30_000) == pytest.approx((1 - 0.5 * 0.999) * (1 + math.cos(math.pi * 6400 / 30_000)) / 2,
                                                        rel=1e-6)
    assert cosine_warmup(15_000, 30_000) == pytest.approx(0.5, rel=1e-6)
    assert cosine_warmup(30_000, 30_000) == pytest.approx(1e-8)


def test_depth_files_in_every_format(tmp_path):
    mm = np.array([[0, 1500], [2500, 65535]], np.uint16)
    Image.fromarray(mm).save(tmp_path / "a.png")
    Image.fromarray(np.array([[0.0, 1.5], [2.5, np.nan]], np.float32)).save(tmp_path / "b.tif")
    np.save(tmp_path / "c.npy", np.array([[1.5, -1.0]], np.float64))
    assert read_depth(tmp_path / "a.png") == pytest.approx(np.array([[0.0, 1.5], [2.5, 65.535]]))
    assert read_depth(tmp_path / "a.png", scale=256) == pytest.approx(np.array([[0, 1500], [2500, 65535]]) / 256)
    assert read_depth(tmp_path / "b.tif").tolist() == [[0.0, 1.5], [2.5, 0.0]]  # metres; NaN: unmeasured
    assert read_depth(tmp_path / "c.npy").tolist() == [[1.5, 0.0]]
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "d.png")
    with pytest.raises(UsageError, match="depth map d.png is L; expected a 16-bit PNG"):
        read_depth(tmp_path / "d.png")
    (tmp_path / "e.png").write_bytes(b"not a png")
    with pytest.raises(UsageError, match="cannot be read"):
        read_depth(tmp_path / "e.png")


def synthetic(n: int, grid: int = 8, dim: int = 32, seed: int = 0):
    """Features whose one direction is what the depth is a function of: smooth random fields, depth 1.5-7.5 m."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=g)
    feats = torch.nn.functional.avg_pool2d(torch.randn(n, dim, grid, grid, generator=g), 3, 1, 1) * 3
    z = torch.einsum("ndhw,d->nhw", feats, direction)
    depth = 4.5 + 3 * torch.tanh(z / z.std())
    depth = torch.nn.functional.interpolate(depth[:, None], scale_factor=4, mode="bilinear")[:, 0]
    depth[:, :, :2] = 0  # unmeasured columns
    return feats, depth


def test_the_depth_probe_learns_what_the_features_see_and_beats_a_constant():
    feats, depth = synthetic(24)
    head = fit_depth(feats[:16].half(), depth[:16].half(), max_depth=10.0, steps=150)
    with torch.no_grad():
        pred = bins_to_depth(head(feats[16:]), 10.0)[:, 0].numpy()
    gt = depth[16:].numpy()
    constant = float(np.median(depth[:16][depth[:16] > 0]))  # the best a probe that sees nothing could do
    probe = mean_errors([depth_errors(t, p, valid_pixels(t, 10.0)) for t, p in zip(gt, pred)])
    flat = mean_errors([depth_errors(t, np.full_like(t, constant), valid_pixels(t, 10.0)) for t in gt])
    print(probe, flat)
    assert probe["rmse"] < 0.5 * flat["rmse"] and probe["abs_rel"] < 0.5 * flat["abs_rel"]
    assert probe["delta1"] > flat["delta1"] + 0.2
