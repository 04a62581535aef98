"""Memory at scale: the student's frozen tensors ARE the teacher's, loading makes no second copy, the export still
holds every tensor, sharing changes no result, and a target cache that cannot fit is refused before it is written."""

from __future__ import annotations

import pytest
import safetensors.torch
import timm
import torch
from accelerate import Accelerator
from conftest import MODEL

from phreg.backbones import PatchTokens, add_registers
from phreg.config.recipe import load_recipe
from phreg.distill.loop import distill
from phreg.distill.loss import distill_loss
from phreg.distill.memory import estimate
from phreg.distill.step import build_parts
from phreg.distill.unlock import unlock
from phreg.errors import UsageError
from phreg.models.loading import load_into_meta, load_teacher
from phreg.targets.cache import cache_bytes, check_fits


def small(tmp_path, weights, *extra):
    return load_recipe(None, [f"output_dir={tmp_path / 'run'}", f"model.name={MODEL}", f"model.checkpoint={weights}",
                              "model.img_size=56", "model.registers=4", "views.num=2", "data.num_workers=0",
                              "train.batch_size=2", "train.max_steps=2", "train.save_every=0", *extra])


def test_loading_builds_no_random_copy_and_equals_timms_own_load(dinov2_file):
    model = load_into_meta(MODEL, dinov2_file, img_size=98)  # pos_embed resampled from 518 by timm's filter
    ref = timm.create_model(MODEL, img_size=98, pretrained=True, pretrained_cfg_overlay=dict(file=str(dinov2_file)))
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_frozen_student_tensors_are_the_teachers_after_prepare(tmp_path, dinov2_file):
    recipe = small(tmp_path, dinov2_file)
    acc = Accelerator(cpu=True)
    parts = build_parts(recipe, acc.device)
    model, _ = acc.prepare(parts.student_tokens, parts.optimizer)
    student = acc.unwrap_model(model).model
    teacher = dict(parts.targets.teacher.named_parameters())
    unlocked = {id(p) for p in parts.params}
    shared = [n for n, p in student.named_parameters() if id(p) not in unlocked]
    assert len(shared) > 100  # all of blocks 0..10, norm, ...
    for n, p in student.named_parameters():
        if n in teacher and teacher[n].shape == p.shape:
            assert (p.data_ptr() == teacher[n].data_ptr()) == (id(p) not in unlocked), n
    compiled = torch.compile(model)  # the compiled wrapper holds the very same parameters
    assert {p.data_ptr() for p in compiled.parameters()} == {p.data_ptr() for p in model.parameters()}
    line = estimate(parts.targets.teacher, student, parts.groups, 2, 2, False, False).line()
    assert "weights 0.09 GB" in line and "shared with the student" in line  # 22.1 M float32 parameters, once


def test_sharing_changes_no_result_and_never_moves_the_teacher():
    recipe = load_recipe(None, ["model.registers=4"])
    torch.manual_seed(0)
    pretrained = timm.create_model(MODEL, pretrained=False, depth=3, img_size=56).state_dict()
    x, target = torch.randn(2, 3, 56, 56), torch.randn(2, 16, 384)
    results = []
    for cloned in (False, True):
        teacher = timm.create_model(MODEL, pretrained=False, depth=3, img_size=56).eval().requires_grad_(False)
        teacher.load_state_dict(pretrained)
        student = add_registers(teacher, 4, seed=0)
        if cloned:  # the unshared path: the student owns a copy of everything
            for p in student.parameters():
                p.data = p.data.clone()
        groups = unlock(student, recipe.train.unlock, 1e-3, 0.0)
        opt = torch.optim.AdamW(groups, lr=1e-3)
        model = PatchTokens(student)
        for _ in range(2):
            distill_loss(model(x), target, 1.0).backward()
            opt.step()
            opt.zero_grad()
        assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in pretrained.items())  # the teacher never moved
        results.append(student.state_dict())
    shared, unshared = results
    assert shared.keys() == unshared.keys()
    assert all(torch.equal(shared[k], unshared[k]) for k in shared)
    assert not torch.equal(shared["blocks.2.mlp.fc1.weight"], pretrained["blocks.2.mlp.fc1.weight"])  # it trained


def test_export_holds_every_tensor_of_a_shared_student(tmp_path, dinov2_file):
    recipe = small(tmp_path, dinov2_file)
    run = distill(recipe, quiet=True)
    exported = safetensors.torch.load_file(str(run / "export" / "model.safetensors"))
    teacher = load_teacher(recipe.model).state_dict()
    stock = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True)
    assert exported.keys() == stock.state_dict().keys()
    for k in ("blocks.0.attn.qkv.weight", "blocks.5.mlp.fc2.bias", "norm.weight"):  # frozen: the teacher's values
        assert torch.equal(exported[k], teacher[k])


def test_cache_size_is_counted_and_a_cache_that_cannot_fit_is_refused(tmp_path, dinov2_file, monkeypatch):
    # 4 images x 2 plans x (16 tokens x 384 dim x 2 bytes + a 56 px uint8 crop + 3 views x 3 int16 + a CRC32)
    assert cache_bytes(4, 2, 16, 384, "float16", 56, 3) == 4 * 2 * (16 * 384 * 2 + 56 * 56 * 3 + 3 * 3 * 2 + 4)
    line = check_fits(tmp_path, 10, 4, 2, 16, 384, "float16")
    assert line.startswith("target cache: 4 images x 2 plans x 16 tokens x 384 dim x float16")
    with pytest.raises(UsageError, match="GB are free there"):  # a petabyte is clearly more than this disk
        check_fits(tmp_path, 10**15, 10**6, 4, 1369, 1536, "float16")
    monkeypatch.setattr("phreg.targets.cache.free_bytes", lambda folder: 1000)
    recipe = small(tmp_path, dinov2_file, "cache.enabled=true")
    with pytest.raises(UsageError, match="target cache: 4 images x 4 plans x 16 tokens x 384 dim"):
        distill(recipe, quiet=True)
    assert not (tmp_path / "run" / "target_cache").exists()  # nothing half-written
    assert not list((tmp_path / "run").glob("**/*.safetensors"))


@pytest.mark.parametrize("name, hidden", [("eva02_base_patch14_224", 2 * 2048), ("vit_small_patch14_dinov2", 1536)])
def test_memory_estimate_counts_every_mlp_branch(name, hidden):
    """SwiGLU MLPs (EVA-02 base, EVA-CLIP) have fc1_g + fc1_x and no fc1: both branches are activations."""
    torch.manual_seed(0)
    teacher = timm.create_model(name, pretrained=False, depth=1, img_size=56).eval().requires_grad_(False)
    student = add_registers(teacher, 4, seed=0)
    groups = unlock(student, load_recipe(None, []).train.unlock, 1e-3, 0.0)
    one = estimate(teacher, student, groups, 2, 1, False, False)
    tokens, dim = 16 + student.num_prefix_tokens, student.embed_dim
    assert one.student_per_image >= tokens * hidden * 4  # the MLP's hidden activations of one block, float32
    assert one.teacher_per_view == (16 + teacher.num_prefix_tokens) * (7 * dim + hidden) * 2 * 4
    chunked = estimate(teacher, student, groups, 8, 4, False, False, chunk=3)  # 32 views, 3 per teacher forward
    whole = estimate(teacher, student, groups, 8, 4, False, False)
    assert whole.total - chunked.total == (32 - 3) * one.teacher_per_view


def test_unlocked_tensors_own_dense_row_major_storage():
    """The student's pos_embed is a slice of the teacher's (class entry folded off); unlocked, it must own exactly its
    bytes with row-major strides, else DDP warns "Grad strides do not match bucket view strides" and copies every
    gradient (strides [98688, 384, 1] against the bucket's [98304, 384, 1] for a (1, 256, 384) tensor)."""
    recipe = load_recipe(None, ["model.registers=4"])
    teacher = timm.create_model(MODEL, pretrained=False, depth=2, img_size=56).eval().requires_grad_(False)
    student = add_registers(teacher, 4, seed=0)
    assert student.pos_embed.untyped_storage().data_ptr() == teacher.pos_embed.untyped_storage().data_ptr()
    groups = unlock(student, recipe.train.unlock, 1e-3, 0.0)
    named = dict(student.named_parameters())
    assert "pos_embed" in [n for g in groups for n in g["names"]]
    for g in groups:
        for n, p in zip(g["names"], g["params"]):
            assert p.stride() == torch.empty(p.shape).stride(), n
            assert p.storage_offset() == 0 and p.untyped_storage().nbytes() == p.numel() * p.element_size(), n
            assert p is named[n] and p.untyped_storage().data_ptr() != teacher.pos_embed.untyped_storage().data_ptr()
