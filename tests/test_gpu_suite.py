"""benchmarks/gpu_suite.sh on a machine without a GPU: one line, exit 0, nothing written; the meta placement its dry
run is built on, where a device mix the GPU would hit raises too."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_gpu_suite_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    env.pop("PHREG_GPU_SUITE_DRY", None)
    out = tmp_path / "suite.json"
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), str(out)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines() == ["gpu_suite: no CUDA GPU on this machine; nothing measured"]
    assert not out.exists()


# ---------------------------------------------------------------------------------------- the meta placement
def _meta_models(views: int = 2):
    """A 2-block DINOv2-S teacher and its student on `meta`, the reference step around them, and phreg's denoised
    teacher (auto chunk), as the dry run places them; the data stays on the CPU."""
    import timm
    from reference import ReferenceStep

    from phreg.backbones import add_registers
    from phreg.denoise.targets import DenoisedTeacher
    from phreg.recipe import ViewsCfg, load_recipe

    teacher = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=2, img_size=56).eval()
    student = add_registers(teacher, 2)
    teacher, student = teacher.to("meta"), student.to("meta")
    ref = ReferenceStep(teacher, student, ["reg_token"], torch.zeros(3), load_recipe(None, []).train)
    targets = DenoisedTeacher(teacher, ViewsCfg(num=views), (0.5,) * 3, (0.2,) * 3).to("meta")
    return ref, targets


def test_reference_step_runs_where_its_models_are():
    """The loader makes views and index maps on the CPU; the reference step moves them to its models' device. With
    the models on `meta` and the data on the CPU (as on a GPU), the whole step runs: a CPU tensor meeting a model
    tensor would raise here as it does on a GPU. Its read-backs (NaN checks, loss.item()) are skipped on meta."""
    import math

    from meta_device import meta_allowances

    ref, _ = _meta_models()
    images, plans = torch.randn(2, 3, 56, 56), torch.tensor([[[0, 0, 0], [1, -1, 1]]] * 2)
    feats, index = ref.teacher_features(images, plans)
    assert feats.device.type == index.device.type == "meta"
    assert feats.shape == (4, 4, 4, 384) and index.shape == (4, 2, 4, 4)
    with meta_allowances():
        target = ref.targets(images, plans)
        assert target.device.type == "meta" and target.shape == (2, 16, 384)
        assert math.isnan(ref.step(images, plans))
    assert ref.params[0].grad.device.type == "meta"


def test_meta_placement_catches_the_cpu_copy_that_crashed_the_gpu_run():
    """bench_distill compares the reference's targets with phreg's. The comparison that crashed on an H200 ("Expected
    all tensors to be on the same device, cuda:0 and cpu") copied one side to the CPU; on meta models with CPU data it
    raises here too, and so does a CPU tensor meeting a model tensor, while the comparison bench_distill makes now
    (both on the models' device) and its FLOP count (CPU images, read by the student on its device) run."""
    import bench_distill
    from meta_device import meta_allowances

    ref, targets = _meta_models()
    x, p = torch.randn(2, 3, 56, 56), torch.tensor([[[0, 0, 0], [1, -1, 1]]] * 2)  # where the loader makes them
    with meta_allowances():
        target = targets(x.to("meta"), p.to("meta"))  # phreg's targets, on the models' device
        assert target.device.type == "meta" and target.shape == (2, 16, 384)
        with pytest.raises(NotImplementedError, match="meta tensor"):
            (ref.targets(x, p) - target.float().cpu()).abs().max()  # the old comparison, written out
        with pytest.raises(RuntimeError, match="device"):
            ref.targets(x, p) - torch.zeros(2, 16, 384)  # a model-device tensor meeting a CPU one
        gap = (ref.targets(x, p) - target.float()).abs().max()  # bench_distill's comparison now
        assert gap.device.type == "meta"
        flops = bench_distill.flops_per_image(ref, x, p)
    assert flops["teacher"] > 0 and flops["student"] > 0


def test_the_dry_runs_step_runs_on_meta_with_fused_adamw_and_nothing_read_back():
    """The fresh-view step on meta as the dry run builds it: fused AdamW (let onto meta for the block only) takes
    its update with the non-finite flag on the device; outside the block, fused AdamW on meta is refused as before."""
    from meta_device import meta_allowances

    from phreg.distill.step import skip_if_nonfinite

    param = torch.nn.Parameter(torch.empty(8, device="meta"))
    optimizer = torch.optim.AdamW([param], fused=True)
    param.grad = torch.empty(8, device="meta")
    with meta_allowances():
        found_inf = skip_if_nonfinite(optimizer, torch.nn.utils.clip_grad_norm_([param], 1.0))
        optimizer.step()
    assert found_inf.device.type == "meta" and optimizer.state[param]["exp_avg"].device.type == "meta"
    other = torch.nn.Parameter(torch.empty(8, device="meta"))
    other.grad = torch.empty(8, device="meta")
    with pytest.raises(RuntimeError, match="fused=True"):
        torch.optim.AdamW([other], fused=True).step()


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
