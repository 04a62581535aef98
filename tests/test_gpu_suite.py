"""benchmarks/gpu_suite.sh on a machine without a GPU: one line, exit 0, nothing written."""

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
    from phreg.recipe import load_recipe

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
