"""The training loop: what trains, what must not, resume, non-finite steps, export, other backbones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from conftest import MODEL

import phreg.distill.loop
import phreg.distill.step
from phreg.backbones import add_registers
from phreg.config.recipe import load_recipe, recipe_hash, save_recipe
from phreg.distill.loop import distill
from phreg.distill.loss import distill_loss
from phreg.distill.step import lr_factor
from phreg.distill.unlock import unlock
from phreg.errors import Aborted
from phreg.hub.export import read_metadata
from phreg.models.loading import load_teacher


def tiny(tmp_path: Path, weights: Path, *extra: str, name="run"):
    """DINOv2-S at 56 px (a 4x4 grid) on the embedded photos: the whole loop in seconds."""
    return load_recipe(None, [f"output_dir={tmp_path / name}", f"model.name={MODEL}", f"model.checkpoint={weights}",
                              "model.img_size=56", "model.registers=4", "views.num=3", "data.num_workers=0",
                              "train.batch_size=2", "train.epochs=1", "train.save_every=0", "train.log_every=1",
                              *extra])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def initial_student(recipe):
    teacher = load_teacher(recipe.model)
    m = recipe.model
    return add_registers(teacher, m.registers, m.register_init, m.register_noise, recipe.seed)


def test_one_step_changes_exactly_the_unlocked_tensors(tmp_path, dinov2_file):
    recipe = tiny(tmp_path, dinov2_file, "train.max_steps=1")
    run = distill(recipe, quiet=True)
    start = initial_student(recipe)
    unlocked = {n for g in unlock(start, recipe.train.unlock, 1.0, 0.0) for n in g["names"]}
    after = weights(run / "export" / "model.safetensors")
    assert set(after) == set(start.state_dict())
    for name, before in start.state_dict().items():
        if name in unlocked:
            assert not torch.equal(after[name], before), f"{name} is unlocked but did not change"
        else:
            assert torch.equal(after[name], before), f"{name} is frozen but changed"
    assert len(unlocked) == 5 + 14  # 3 tokens/embeddings, patch conv (2), the 14 tensors of the last block


def test_export_loads_in_stock_timm_and_equals_the_trained_student(tmp_path, dinov2_file):
    recipe = tiny(tmp_path, dinov2_file, "train.max_steps=3")
    run = distill(recipe, quiet=True)
    exported = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
    assert exported.num_reg_tokens == 4 and exported.no_embed_class and exported.patch_embed.img_size == (56, 56)
    trained = initial_student(recipe)  # the student as the last training checkpoint holds it: base + what trains
    ckpt = weights(next((run / "checkpoints").glob("step_*")) / "model.safetensors")
    unlocked = {n for g in unlock(initial_student(recipe), recipe.train.unlock, 1.0, 0.0) for n in g["names"]}
    assert {k.removeprefix("model.") for k in ckpt} == unlocked  # only what trains
    trained.load_state_dict({k.removeprefix("model."): v for k, v in ckpt.items()}, strict=False)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        diff = (exported.forward_features(x) - trained.eval().forward_features(x)).abs().max().item()
    assert diff < 1e-4
    meta = read_metadata(run / "export" / "model.safetensors")
    assert meta["base_model"] == MODEL and meta["recipe_hash"] == recipe_hash(recipe) and meta["phreg_version"]
    cfg = json.loads((run / "export" / "config.json").read_text())
    assert cfg["model_args"]["reg_tokens"] == 4 and cfg["model_args"]["no_embed_class"] is True
    assert cfg["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["images_seen"] == 6
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


CRASH = textwrap.dedent("""
    import os, sys
    import phreg.distill.loop as t
    from phreg.config.recipe import load_recipe
    real = t.save_checkpoint
    def crash_after(acc, run, step, *args):
        real(acc, run, step, *args)
        if step == int(sys.argv[1]):
            os._exit(9)  # as abrupt as a kill: no cleanup, no export
    t.save_checkpoint = crash_after
    t.distill(load_recipe(sys.argv[2], sys.argv[3:]), quiet=True)
""")


@pytest.mark.parametrize("mode", ["fresh_views", "cache_and_accumulation"])
@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, dinov2_file, mode):
    extra = ["train.batch_size=1", "train.max_steps=6", "train.save_every=2"]  # 4 photos: resume mid-epoch
    if mode != "fresh_views":
        extra += ["cache.enabled=true", "cache.plans=2", "train.grad_accum=2"]
    recipe = save_recipe(tiny(tmp_path, dinov2_file, *extra), tmp_path / "recipe.yaml")
    straight, broken = tmp_path / "straight", tmp_path / "broken"

    def phreg(*args):
        return subprocess.run([sys.executable, "-m", "phreg", "distill", str(recipe), "--quiet", *args],
                              capture_output=True, text=True, check=True)

    phreg(f"output_dir={straight}")
    crashed = subprocess.run([sys.executable, "-c", CRASH, "2", str(recipe), f"output_dir={broken}"],
                             capture_output=True, text=True)
    assert crashed.returncode == 9, crashed.stderr
    assert not (broken / "export").exists()
    assert [p.name for p in (broken / "checkpoints").iterdir()] == ["step_00000002"]
    phreg(f"output_dir={broken}", "--resume")
    a, b = weights(straight / "export/model.safetensors"), weights(broken / "export/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(ln).get("step") for ln in (broken / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_nonfinite_steps_are_skipped_then_abort(tmp_path, dinov2_file, monkeypatch):
    monkeypatch.setattr(phreg.distill.step, "distill_loss", lambda s, t, w: distill_loss(s, t, w) * float("nan"))
    recipe = tiny(tmp_path, dinov2_file, "train.max_steps=1", "train.max_nonfinite_share=1", name="skip")
    with pytest.raises(Aborted, match="none of the 1 steps had a finite loss"):  # never a finite step: no export
        distill(recipe, quiet=True)
    run = Path(recipe.output_dir)
    assert not (run / "export").exists()
    start = initial_student(recipe).state_dict()
    after = weights(next((run / "checkpoints").glob("step_*")) / "model.safetensors")
    assert all(torch.equal(after[k], start[k.removeprefix("model.")]) for k in after)  # the NaN step changed nothing

    recipe = tiny(tmp_path, dinov2_file, "train.max_steps=6", "train.max_nonfinite=2", "train.max_nonfinite_share=1",
                  name="abort")
    with pytest.raises(Aborted, match="3 of 3 steps had a non-finite loss or gradient"):
        distill(recipe, quiet=True)
    assert not (Path(recipe.output_dir) / "export").exists()


@pytest.mark.slow
def test_a_short_run_with_a_share_of_nonfinite_steps_does_not_export(tmp_path, dinov2_file, monkeypatch):
    """2 NaN steps of 4 (train.max_nonfinite=10 alone must not let it export and exit 0)."""
    real, calls = phreg.distill.step.distill_loss, []

    def every_other_nan(s, t, w):
        calls.append(1)
        return real(s, t, w) * (float("nan") if len(calls) % 2 else 1.0)

    monkeypatch.setattr(phreg.distill.step, "distill_loss", every_other_nan)
    recipe = tiny(tmp_path, dinov2_file, "train.max_steps=4", "train.log_every=1", name="share")
    with pytest.raises(Aborted, match=r"1 of 1 steps .*train.max_nonfinite_share=0.1 of 4 steps"):
        distill(recipe, quiet=True)
    assert not (Path(recipe.output_dir) / "export").exists()


def test_schedules():
    cfg = load_recipe(None, ["train.lr=1e-4", "train.end_lr=1e-6"]).train
    f = lr_factor(cfg, 100)
    assert f(0) == 1.0 and f(100) == pytest.approx(1e-2) and f(50) == pytest.approx(1e-1)
    cfg = load_recipe(None, ["train.schedule=cosine", "train.warmup_steps=10", "train.end_lr=0"]).train
    f = lr_factor(cfg, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(60) == pytest.approx(0.5) and f(110) == 0.0


def test_loss_by_hand():
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    assert distill_loss(a, a).item() == 0.0
    b = torch.tensor([[[0.0, 1.0], [0.0, 2.0]]])  # token 0 orthogonal (1 - cos = 1), token 1 identical
    assert distill_loss(a, b, mse_weight=0.0).item() == pytest.approx(0.5)
    assert distill_loss(a, b).item() == pytest.approx(0.5 + 2 / 4)  # MSE: (1 + 1) / 4 elements


@pytest.mark.parametrize("arch", ["vit_base_patch16_clip_224.openai", "deit3_small_patch16_224.fb_in1k"])
@pytest.mark.slow
def test_other_backbones_run_the_whole_pipeline(tmp_path, arch):
    """CLIP (pre-norm, projection head) and DeiT-III (no_embed_class, class head) with random weights."""
    model = timm.create_model(arch, pretrained=False)
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    recipe = load_recipe(None, [f"output_dir={tmp_path / 'run'}", f"model.name={arch}",
                                f"model.checkpoint={tmp_path / 'w.safetensors'}", "model.img_size=64",
                                "model.registers=2", "views.num=2", "data.num_workers=0", "train.batch_size=2",
                                "train.max_steps=2", "train.save_every=0",
                                # CLIP's head is its image-text projection: kept; DeiT-III's ImageNet classifier: dropped
                                f"export.head={'keep' if 'clip' in arch else 'drop'}"])
    run = distill(recipe, quiet=True)
    student = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
    classes = model.num_classes if "clip" in arch else 0
    assert student.num_reg_tokens == 2 and student.num_classes == classes
    with torch.no_grad():
        assert student(torch.randn(1, 3, 64, 64)).shape == (1, classes or model.num_features)


@pytest.mark.slow
def test_two_processes_train_like_one_with_their_batches_together(tmp_path, dinov2_file):
    """`torchrun`/`accelerate launch` with 2 CPU processes x batch 2 = one process x batch 4 on the same 4 photos:
    DDP averages the gradients, the sharded cache build is shared, and only rank 0 writes the run files."""
    extra = ["data.val_split=0", "train.epochs=3", "cache.enabled=true", "cache.plans=2"]
    recipe = tiny(tmp_path, dinov2_file, *extra)
    two = tmp_path / "two"
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "phreg",
                               "distill", str(save_recipe(recipe, tmp_path / "recipe.yaml")), f"output_dir={two}", "--quiet"],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "Grad strides do not match" not in launched.stderr  # unlocked tensors own row-major storage
    assert launched.stdout.count("done:") == 1
    one = distill(tiny(tmp_path, dinov2_file, *extra, "train.batch_size=4", name="one"), quiet=True)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["hardware"]["processes"] == 2 and summary["steps"] == 3 and summary["images_seen"] == 12
    assert [json.loads(ln)["step"] for ln in (two / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    a, b = weights(one / "export/model.safetensors"), weights(two / "export/model.safetensors")
    start = initial_student(recipe).state_dict()
    for name in a:  # Adam turns float-rounding-sized gradient differences into lr-sized steps: compare to the move
        moved = (a[name] - start[name]).norm()
        assert (a[name] - b[name]).norm() <= 0.01 * moved, name  # measured: <= 0.0012


@pytest.mark.slow
def test_the_unlocked_table_is_one_line_unless_verbose_and_always_in_the_run_folder(tmp_path, dinov2_file, capsys):
    """The quickstart's 28 console lines were 19 rows of this table: one summary line by default."""
    run = distill(tiny(tmp_path, dinov2_file, "train.max_steps=1"), quiet=False)
    out = capsys.readouterr().out
    table = (run / "unlocked.txt").read_text()
    assert table.startswith("unlocked parameter") and "reg_token" in table and "blocks.11.mlp.fc2.weight" in table
    assert "total unlocked" in table
    rows = [ln for ln in out.splitlines() if ln.startswith(("unlocked", "total unlocked"))]
    assert len(rows) == 1 and rows[0].startswith("unlocked 2,009,472 of 21,537,792 parameters (9.3%) in 19 tensors, "
                                                 "lr 1e-04/1e-05; the table: "), out
    assert "reg_token" not in out and "blocks.11" not in out
    distill(tiny(tmp_path, dinov2_file, "train.max_steps=1", name="verbose"), quiet=False, verbose=True)
    assert (tmp_path / "verbose" / "unlocked.txt").read_text() in capsys.readouterr().out
