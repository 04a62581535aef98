"""benchmarks/gpu_suite.sh on a machine without a GPU: one line, exit 0, nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    env.pop("PHREG_GPU_SUITE_DRY", None)
    out = tmp_path / "suite.json"
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), str(out)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines() == ["gpu_suite: no CUDA GPU on this machine; nothing measured"]
    assert not out.exists()


def test_reference_step_runs_where_its_models_are():
    """The loader makes views and index maps on the CPU; the reference step must move them to its models' device.
    Issue 19: it fed CPU views to a CUDA teacher and crashed on any GPU. Shown here with the models on `meta`: the
    step gets through views, teacher forward and the index scatter, up to its NaN check (a read-back meta cannot do)."""
    import timm
    from torch.fx.experimental import _config as fx_config

    sys.path.insert(0, str(REPO / "benchmarks"))
    from reference import ReferenceStep

    from phreg.backbones import add_registers
    from phreg.config.recipe import load_recipe

    teacher = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=2, img_size=56).eval()
    student = add_registers(teacher, 2)
    ref = ReferenceStep(teacher.to("meta"), student.to("meta"), ["reg_token"], torch.zeros(3),
                        load_recipe(None, []).train)
    images, plans = torch.randn(2, 3, 56, 56), torch.tensor([[[0, 0, 0], [1, -1, 1]]] * 2)
    feats, index = ref.teacher_features(images, plans)
    assert feats.device.type == index.device.type == "meta"
    assert feats.shape == (4, 4, 4, 384) and index.shape == (4, 2, 4, 4)
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        with pytest.raises(RuntimeError, match="meta tensors"):
            ref.targets(images, plans)


def _suite():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_suite

    return gpu_suite


def test_a_part_that_overruns_its_box_is_cut_and_the_json_keeps_the_others(tmp_path):
    """The suite must return a partial JSON when time runs out: a part over its box is recorded as cut, a failing
    part as its error, and the file holds every part finished so far after each one."""
    import time

    suite, out, result = _suite(), tmp_path / "suite.json", {}
    deadline = time.perf_counter() + 60
    suite.run_part(result, out, "fast", deadline, 1.0, lambda end: {"images_per_s": 1.0})
    suite.run_part(result, out, "slow", time.perf_counter() + 12, 0.1, lambda end: time.sleep(30))
    suite.run_part(result, out, "broken", deadline, 1.0, lambda end: 1 / 0)
    suite.run_part(result, out, "late", time.perf_counter() + 5, 1.0, lambda end: {"never": True})
    saved = json.loads(out.read_text())
    assert saved["fast"] == {"images_per_s": 1.0}
    assert saved["slow"].startswith("out of time") and saved["part_s"]["slow"] < 5
    assert saved["broken"]["error"].startswith("ZeroDivisionError")
    assert saved["late"] == "skipped: out of time"


def test_steady_rate_leaves_out_warm_up_and_projection_follows_the_rates(tmp_path):
    suite = _suite()
    metrics = tmp_path / "metrics.jsonl"
    rows = [dict(step=5, loss=1.0, elapsed_s=60.0), dict(step=10, loss=0.9, elapsed_s=61.0),  # compiled in row 1
            dict(step=15, loss=0.8, elapsed_s=62.0), dict(step=20, loss=0.7, elapsed_s=63.0), dict(heldout={})]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert suite.steady_rate(metrics, batch=8, skip=1) == 15 * 8 / 3.0
    assert suite.steady_rate(metrics, batch=8, skip=2) == 10 * 8 / 2.0
    p = suite.projection(dict(fresh_eager=dict(images_per_s=100.0), fresh_compiled=dict(images_per_s=120.0),
                              cached_eager=dict(images_per_s=600.0, cache_s=0.5, cache_images=64)), plans=2)
    image_steps = 31_783 * 100
    assert p["fresh_hours"] == round(image_steps / 120 / 3600, 2)  # the faster of eager and compiled
    assert p["cache_build_hours"] == round(2 * 31_783 / 128 / 3600, 2)
    assert p["cached_hours"] == round(2 * 31_783 / 128 / 3600 + image_steps / 600 / 3600, 2)
    assert suite.mfu(100.0, 3737.0, 989.0) == round(100 * 3.737 / 989, 3)
