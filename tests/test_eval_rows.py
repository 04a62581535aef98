"""Which images each row of `phreg eval` is measured on, and what its label says about them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def test_the_worst_block_of_a_side_without_outliers_says_so(monkeypatch):
    """`(blocks 0 / 0)` named block 0 as the worst of a teacher that has no outlier at any block."""
    from phreg.eval import metrics

    flat = torch.full((3, 2, 16), 10.0)  # (blocks, images, patches): every token at its image's median
    spiky = flat.clone()
    spiky[1, 0, 5] = 100.0  # one token above 2x the median, at block 1
    norms = {"teacher-model": flat, "student-model": spiky}
    monkeypatch.setattr(metrics, "block_patch_norms", lambda model, images: norms[model])
    ctx = SimpleNamespace(a_t=SimpleNamespace(tta=SimpleNamespace(images=None)),
                          teacher=SimpleNamespace(model="teacher-model"),
                          student=SimpleNamespace(model="student-model"),
                          images=lambda indices=None: None)
    rows = {row["metric"]: row for row in metrics.norm_tails(ctx).rows}
    assert rows["outliers_worst_block"]["label"] == "  same, at the block with the most (no outliers / block 1)"
    assert rows["outliers_worst_block"]["student"] == pytest.approx(1 / 32)
    norms["teacher-model"] = spiky
    rows = {row["metric"]: row for row in metrics.norm_tails(ctx).rows}
    assert rows["outliers_worst_block"]["label"].endswith("(block 1 / block 1)")
