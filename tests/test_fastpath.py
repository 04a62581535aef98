"""The fast path changes speed, not results: each switch checked against the plain path."""

from __future__ import annotations

import contextlib
import json

import pytest
import safetensors.torch
import timm
import torch

from phreg.backbones import add_registers
from phreg.backbones.attention import set_fused_attention
from phreg.config.recipe import SpeedCfg, UnlockGroup, ViewsCfg
from phreg.distill.loop import distill
from phreg.distill.speed import teacher_autocast
from phreg.distill.unlock import unlock
from phreg.targets.teacher import DenoisedTeacher, auto_chunk

from test_train import initial_student, tiny, weights


def test_fused_and_eager_attention_agree(teacher224, photos):
    student = add_registers(teacher224, 16)
    with torch.no_grad():
        fused = student.forward_features(photos)
        set_fused_attention(student, False)
        assert not student.blocks[0].attn.fused_attn
        eager = student.forward_features(photos)
    assert (fused - eager).abs().max().item() < 1e-4


def test_chunked_teacher_views_equal_one_forward(teacher224, photos):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    plans = torch.tensor([[[0, 0, 0], [1, -2, 1], [-2, 2, 0]]]).expand(2, -1, -1)
    one = DenoisedTeacher(teacher224, ViewsCfg(num=3, chunk=6), mean, std)(photos[:2], plans)
    chunked = DenoisedTeacher(teacher224, ViewsCfg(num=3, chunk=1), mean, std)(photos[:2], plans)
    assert (one - chunked).abs().max().item() < 1e-4


def test_auto_choices_on_cpu(teacher224):
    cpu = torch.device("cpu")
    assert auto_chunk(teacher224, cpu, bf16=False) == 2048 // 257  # ~2K tokens per forward on a CPU
    assert teacher_autocast(SpeedCfg(), cpu, "fp32") is contextlib.nullcontext  # bf16 is slower there
    with teacher_autocast(SpeedCfg(teacher_precision="bf16"), cpu, "fp32")():
        assert torch.is_autocast_enabled("cpu")


@pytest.mark.slow
def test_engine_is_correct_with_every_fast_path_switch_on(tmp_path, dinov2_file):
    """compile (teacher and student), a bf16 teacher, one view per teacher forward, fused attention, cached targets."""
    fast = ["speed.compile=true", "speed.teacher_precision=bf16", "speed.fused_attn=true", "views.chunk=1",
            "cache.enabled=true", "cache.plans=1", "train.max_steps=2", "train.save_every=1"]
    recipe = tiny(tmp_path, dinov2_file, *fast, name="fast")
    run = distill(recipe, quiet=True)
    plain = distill(tiny(tmp_path, dinov2_file, "train.max_steps=2", "speed.compile=false", "cache.enabled=true",
                         "cache.plans=1", name="plain"), quiet=True)

    start = initial_student(recipe)
    unlocked = {n for g in unlock(start, recipe.train.unlock, 1.0, 0.0) for n in g["names"]}
    after = weights(run / "export" / "model.safetensors")
    for name, before in start.state_dict().items():
        assert torch.equal(after[name], before) != (name in unlocked), name  # frozen: bitwise; unlocked: moved

    exported = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
    trained = initial_student(recipe)
    ckpt = safetensors.torch.load_file(str(sorted((run / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))
    assert {k.removeprefix("model.") for k in ckpt} == unlocked  # what trains, named alike with compile on
    trained.load_state_dict({k.removeprefix("model."): v for k, v in ckpt.items()}, strict=False)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert (exported.forward_features(x) - trained.eval().forward_features(x)).abs().max().item() < 1e-4

    losses = [[json.loads(ln)["loss"] for ln in (r / "metrics.jsonl").read_text().splitlines()] for r in (run, plain)]
    assert abs(losses[0][0] - losses[1][0]) < 0.02 * losses[1][0], losses  # bf16 teacher: targets to ~1e-2


def test_the_steps_math_runs_on_meta_so_it_never_reads_back_to_the_host():
    """Views, teacher, merge, student, loss, backward and the clip + non-finite flag of `train_step`, with every
    tensor on `meta`: any host read-back (`.item()`, `if tensor`, `.tolist()`) or tensor made on the CPU fails there,
    as it would cost a GPU-host sync per step (a view built with affine matrices on the CPU, inverted with a syncing
    `torch.inverse`, would)."""
    from phreg.backbones import PatchTokens
    from phreg.distill.loss import distill_loss
    from phreg.distill.step import skip_if_nonfinite

    teacher = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=2, img_size=56).eval()
    student = add_registers(teacher, 2)
    params = [p for g in unlock(student, [UnlockGroup(params=["registers", "pos_embed", "last_block"])], 1e-3, 0.0)
              for p in g["params"]]
    optimizer = torch.optim.AdamW(params)
    teacher, student = teacher.to("meta"), student.to("meta")
    params = [p for p in student.parameters() if p.requires_grad]
    targets = DenoisedTeacher(teacher, ViewsCfg(num=3, chunk=6), (0.5,) * 3, (0.2,) * 3).to("meta")
    images = torch.empty(2, 3, 56, 56, device="meta")
    plans = torch.tensor([[[0, 0, 0], [1, -1, 1], [-1, 0, 0]]] * 2, device="meta")
    target = targets(images, plans)
    assert target.device.type == "meta" and target.shape == (2, 16, 384)
    loss = distill_loss(PatchTokens(student)(images), target)
    loss.backward()
    found_inf = skip_if_nonfinite(optimizer, torch.nn.utils.clip_grad_norm_(params, 1.0))
    assert found_inf.device.type == "meta" and all(p.grad is not None for p in params)


@pytest.mark.slow
def test_a_compiled_run_never_recompiles_across_epochs_and_a_partial_last_batch(tmp_path, dinov2_file, monkeypatch):
    """speed.compile=true over 3 epochs of 3 photos at batch 2 (the last batch of each epoch would hold 1) with a
    held-out photo (the teacher's held-out batch is smaller than a training batch): teacher and student each compile
    once and never again: not at a partial batch (`size mismatch at index 0. expected 2, actual 1`), not on grad mode
    or autocast guards shared between teacher and student."""
    import torch._dynamo

    torch._dynamo.reset()  # compiled frames of earlier tests would count as recompiles here
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    run = distill(tiny(tmp_path, dinov2_file, "speed.compile=true", "data.val_split=0.25", "train.epochs=3",
                       "train.eval_every=2"), quiet=True)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "step" in r] == [1, 2, 3]  # one whole batch per epoch: the partial one dropped
    assert json.loads((run / "summary.json").read_text())["images_seen"] == 6
    assert torch._dynamo.utils.counters["frames"]["ok"] == 2, dict(torch._dynamo.utils.counters["frames"])
