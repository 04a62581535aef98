"""Metric building blocks on cases where the answer is known by hand."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from phreg.errors import UsageError
from phreg.eval.inputs import split_indices
from phreg.eval.probe import fit_probe, load_masks, probe_confusion
from phreg.eval.segmentation import scores
from phreg.eval.tokens import neighbour_cosine, otsu, outlier_threshold, pca_rgb
from phreg.files.atomic import write_json


def test_otsu_splits_two_clusters_in_the_gap():
    values = torch.cat([torch.full((50,), 1.0), torch.full((50,), 9.0)])
    assert 1.0 < otsu(values) < 9.0


def test_bimodal_norms_give_a_threshold_between_the_modes():
    g = torch.Generator().manual_seed(0)
    normal = 50 + 3 * torch.randn(2000, generator=g)
    artifacts = 200 + 20 * torch.randn(40, generator=g)
    rule = outlier_threshold(torch.cat([normal, artifacts]))
    assert rule["bimodal"] and normal.max() < rule["threshold"] < artifacts.min()
    assert rule["high_fraction"] == pytest.approx(40 / 2040)


def test_unimodal_norms_have_no_outliers():
    g = torch.Generator().manual_seed(0)
    norms = (3.8 + 0.1 * torch.randn(5000, generator=g)).exp()  # log-normal, a single mode
    rule = outlier_threshold(norms)
    assert not rule["bimodal"] and rule["threshold"] == math.inf


def test_neighbour_cosine_by_hand():
    v = torch.randn(8)
    flat = v.expand(1, 16, 8).contiguous()
    assert torch.allclose(neighbour_cosine(flat, (4, 4)), torch.ones(1, 16), atol=1e-6)
    sign = torch.tensor([[(-1) ** (i + j) for j in range(4)] for i in range(4)], dtype=torch.float).flatten()
    checker = (sign[:, None] * v)[None]  # every neighbour points the other way
    assert torch.allclose(neighbour_cosine(checker, (4, 4)), -torch.ones(1, 16), atol=1e-6)


def test_pca_colours_are_images():
    rgb = pca_rgb(torch.randn(64, 32), (8, 8))
    assert rgb.shape == (8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1


def test_miou_and_accuracy_by_hand():
    # truth [[0,0],[1,1]], prediction [[0,1],[1,1]]: IoU(0) = 1/2, IoU(1) = 2/3, accuracy 3/4
    cm = torch.tensor([[1, 1], [0, 2]])
    s = scores(cm)
    assert s["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2) and s["pixel_accuracy"] == pytest.approx(0.75)
    assert s["per_class_iou"] == [0.5, pytest.approx(0.6667, abs=1e-4)]


def test_confusion_upsamples_logits_and_skips_the_ignore_index():
    class Const(torch.nn.Module):  # predicts class 1 everywhere
        def forward(self, x):
            return torch.stack([torch.zeros_like(x[:, 0]), torch.ones_like(x[:, 0])], 1)

    mask = torch.tensor([[0, 1, 1, 7], [1, 1, 7, 7]])
    cm = probe_confusion(Const(), torch.zeros(1, 3, 1, 2), [mask], num_classes=2, ignore_index=7)
    assert cm.tolist() == [[0, 1], [0, 4]]


def test_probe_learns_separable_features():
    g = torch.Generator().manual_seed(0)
    n, k, grid = 6, 3, 8
    masks = [torch.randint(0, k, (grid, grid), generator=g).repeat_interleave(4, 0).repeat_interleave(4, 1)
             for _ in range(n)]  # labels constant over each 4x4 pixel block = one feature cell
    codes = torch.randn(k, 16, generator=g)
    feats = torch.stack([codes[m[::4, ::4]].permute(2, 0, 1) for m in masks]) + 0.1 * torch.randn(n, 16, grid, grid,
                                                                                                   generator=g)
    head = fit_probe(feats[:4], masks[:4], k, None, steps=200)
    s = scores(probe_confusion(head, feats[4:], masks[4:], k, None))
    assert s["pixel_accuracy"] > 0.95 and s["miou"] > 0.9


def test_masks_must_match(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "m").mkdir()
    a = tmp_path / "img" / "a.png"
    Image.new("RGB", (8, 6)).save(a)
    with pytest.raises(UsageError, match="no mask for a.png"):
        load_masks([a], tmp_path / "m", 3, None)
    Image.new("L", (8, 5)).save(tmp_path / "m" / "a.png")
    with pytest.raises(UsageError, match="is 8x5 but its image is 8x6"):
        load_masks([a], tmp_path / "m", 3, None)
    Image.new("RGB", (8, 6)).save(tmp_path / "m" / "a.png")
    with pytest.raises(UsageError, match="expected a single-channel"):
        load_masks([a], tmp_path / "m", 3, None)
    Image.fromarray(np.full((6, 8), 5, np.uint8)).save(tmp_path / "m" / "a.png")
    with pytest.raises(UsageError, match="class ids outside 0..2"):
        load_masks([a], tmp_path / "m", 3, None)
    assert load_masks([a], tmp_path / "m", 3, 5)[0].shape == (6, 8)  # 5 is the ignore index: fine


def test_splits(tmp_path):
    files = [tmp_path / f"{n}.png" for n in "abcdefgh"]
    train, val = split_indices(files, None)
    assert val == [3, 7] and train == [0, 1, 2, 4, 5, 6]
    (tmp_path / "s.csv").write_text("file,split\n" + "".join(f"{f.name},{'val' if i < 2 else 'train'}\n"
                                                             for i, f in enumerate(files)))
    assert split_indices(files, str(tmp_path / "s.csv")) == ([2, 3, 4, 5, 6, 7], [0, 1])
    (tmp_path / "s.txt").write_text("a train\nb val\n")
    with pytest.raises(UsageError, match="does not list c.png"):
        split_indices(files, str(tmp_path / "s.txt"))


def test_json_outputs_are_strict(tmp_path):
    write_json(tmp_path / "x.json", dict(t=float("inf"), n=[float("nan"), 1.0]))
    assert json.loads((tmp_path / "x.json").read_text()) == dict(t=None, n=[None, 1.0])
