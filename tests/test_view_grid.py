"""A resolution whose patch grid lets no teacher view differ from the image (no shift, no mirror) is refused in one
line before any weight is read, naming the smallest grid on which `views.max_shift` shifts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import MODEL

from phreg.cli import main
from phreg.config.recipe import ModelCfg, ViewsCfg
from phreg.errors import UsageError

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def shifts_on(grid: int, max_shift: float) -> bool:
    """Does the view sampler itself ever shift a view on this grid?"""
    from phreg.targets.views import sample_plan

    plan = sample_plan((grid, grid), 64, max_shift, 0.0, np.random.default_rng(0), candidates=4096)
    return bool(plan[:, :2].abs().max() > 0)


@pytest.mark.parametrize("max_shift", [0.05, 0.1, 0.15, 0.25, 0.3, 0.5])
def test_the_smallest_shifting_grid_is_where_the_sampler_first_shifts(max_shift):
    from phreg.models.names import smallest_shifting_grid

    g = smallest_shifting_grid(max_shift)
    assert shifts_on(g, max_shift) and not shifts_on(g - 1, max_shift)
    assert smallest_shifting_grid(0.0) is None


def test_a_one_patch_grid_is_refused_before_the_weights_are_read(monkeypatch, dinov2_file):
    from phreg.models import loading

    monkeypatch.setattr(loading, "load_into_meta", lambda *a, **k: pytest.fail("the weights were read"))
    with pytest.raises(UsageError) as e:
        loading.load_teacher(ModelCfg(name=MODEL, checkpoint=str(dinov2_file), img_size=14), views=ViewsCfg())
    assert str(e.value) == (
        "model.img_size=14 gives a 1x1 patch grid (patch 14): the teacher's views can be neither shifted nor "
        "mirrored, so every view is the image and nothing is denoised; views.max_shift=0.15 first shifts on a 4x4 "
        "grid: model.img_size=56 or more")


def test_mirrors_alone_are_views_and_no_views_at_all_are_refused():
    from phreg.models.names import check_view_grid

    check_view_grid(2, 14, ViewsCfg(max_shift=0.15, flip=0.5))  # 28 px: mirrored views, denoising something
    check_view_grid(1, 14, ViewsCfg(num=1))  # one view asked for: the plain teacher, as asked
    with pytest.raises(UsageError, match=r"2x2 patch grid .* not shifted \(views.max_shift=0.15\) nor mirrored "
                                         r"\(views.flip=0\).* model.img_size=56 or more"):
        check_view_grid(2, 14, ViewsCfg(max_shift=0.15, flip=0.0))
    with pytest.raises(UsageError, match="views.max_shift=0 never shifts"):
        check_view_grid(8, 14, ViewsCfg(max_shift=0.0, flip=0.0))


def test_distill_says_it_in_one_line_and_writes_nothing(tmp_path, capsys, dinov2_file):
    run = tmp_path / "run"
    assert main(["distill", str(QUICKSTART), f"model.checkpoint={dinov2_file}", "model.img_size=14",
                 f"output_dir={run}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1x1 patch grid" in err[0], err
    assert not run.exists()
