"""Teacher loading, the student with registers, the unlocked subset: on real DINOv2-S weights."""

from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from conftest import MODEL

from phreg.backbones import add_registers, patch_tokens
from phreg.config.recipe import ModelCfg, UnlockGroup, paper_unlock
from phreg.distill.unlock import unlock
from phreg.errors import UsageError
from phreg.models.loading import load_teacher
from phreg.targets.heldout import cosine_distance


def test_student_without_registers_is_the_teacher(teacher224, photos):
    student = add_registers(teacher224, 0)
    assert student.num_reg_tokens == 0 and student.no_embed_class and student.pos_embed.shape[1] == 256
    with torch.no_grad():
        a, b = teacher224.forward_features(photos), student.forward_features(photos)
    assert (a - b).abs().max().item() < 1e-5


def test_registers_are_real_timm_registers(teacher224, photos):
    student = add_registers(teacher224, 16)
    assert isinstance(student, timm.models.vision_transformer.VisionTransformer)
    assert student.num_prefix_tokens == 17 and student.reg_token.shape == (1, 16, 384)
    assert student.blocks[3].attn.fused_attn  # registers keep timm's fused SDPA attention
    with torch.no_grad():
        assert student.forward_features(photos).shape == (4, 17 + 256, 384)


def test_function_preserving_init_starts_near_the_teacher(teacher224, photos):
    """Why pos_mean is the default: the paper's randn registers disturb every patch token at step 0."""
    with torch.no_grad():
        t = patch_tokens(teacher224, photos)
        d = {init: cosine_distance(patch_tokens(add_registers(teacher224, 16, init), photos), t).mean().item()
             for init in ("pos_mean", "randn")}
    assert d["pos_mean"] < 0.02 and d["randn"] > 3 * d["pos_mean"], d


def test_register_init_is_seeded(teacher224):
    a, b, c = (add_registers(teacher224, 4, "pos_mean", 0.02, seed=s).reg_token for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[0, 0] - a[0, 1]).abs().max() > 0  # noise breaks the symmetry between registers


def test_unlock_freezes_everything_else(teacher224):
    student = add_registers(teacher224, 16)
    groups = unlock(student, paper_unlock(), lr=1e-4, weight_decay=0.01)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    expected = {"reg_token", "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"} | \
        {n for n, _ in student.named_parameters() if n.startswith("blocks.11.")}
    assert trainable == expected
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-5])
    assert sum(len(g["params"]) for g in groups) == len(expected)


@pytest.mark.parametrize("patterns,message", [
    (["blocks.99.*"], "matches no parameter"),
    (["pos_embed", "pos_*"], None),  # overlapping patterns inside one group are fine
])
def test_unlock_patterns(teacher224, patterns, message):
    student = add_registers(teacher224, 1)
    if message:
        with pytest.raises(UsageError, match=message):
            unlock(student, [UnlockGroup(params=patterns)], 1e-4, 0.0)
    else:
        assert len(unlock(student, [UnlockGroup(params=patterns)], 1e-4, 0.0)[0]["params"]) == 1
    with pytest.raises(UsageError, match="matched by groups 0 and 1"):
        unlock(student, [UnlockGroup(params=["pos_embed"]), UnlockGroup(params=["pos_*"])], 1e-4, 0.0)


def test_weights_found_in_checkpoints_folder(checkpoints, teacher224, photos):
    found = load_teacher(ModelCfg(name=MODEL, img_size=224))
    tagged = load_teacher(ModelCfg(name=MODEL + ".lvd142m", img_size=224))  # tag stripped for the lookup
    with torch.no_grad():
        ref = teacher224.forward_features(photos)
        assert torch.equal(found.forward_features(photos), ref) and torch.equal(tagged.forward_features(photos), ref)
    assert not any(p.requires_grad for p in found.parameters()) and not found.training


def test_official_dinov2_layout_and_pth(tmp_path, dinov2_file, teacher224, photos):
    """Meta's release layout (mask_token, 518-px pos_embed) as .pth goes through timm's own checkpoint_filter_fn."""
    sd = safetensors.torch.load_file(str(dinov2_file))
    sd["mask_token"] = torch.zeros(1, 384)
    torch.save(sd, tmp_path / "dinov2_vits14_pretrain.pth")
    m = load_teacher(ModelCfg(name=MODEL, img_size=224, checkpoint=str(tmp_path / "dinov2_vits14_pretrain.pth")))
    with torch.no_grad():
        torch.testing.assert_close(m.forward_features(photos), teacher224.forward_features(photos))


def test_resolution_is_resampled(dinov2_file):
    m = load_teacher(ModelCfg(name=MODEL, img_size=168, checkpoint=str(dinov2_file)))
    assert m.pos_embed.shape == (1, 1 + 12 * 12, 384)
    with pytest.raises(UsageError, match=r"not a multiple of the patch size 14; nearest valid sizes: 224, 238"):
        load_teacher(ModelCfg(name=MODEL, img_size=230, checkpoint=str(dinov2_file)))


def test_load_errors_are_one_line(tmp_path, monkeypatch, dinov2_file):
    monkeypatch.setenv("PHREG_CHECKPOINTS", str(tmp_path))
    text = tmp_path / "notes.pth"
    text.write_text("these are notes, not weights")
    cases = [
        (ModelCfg(name=MODEL),
         f"no weights for {MODEL} (HF_HUB_OFFLINE is set, nothing cached): pass model.checkpoint=FILE"),
        (ModelCfg(name="vit_tiny_patch16_224", checkpoint=str(dinov2_file)), "does not fit vit_tiny_patch16_224"),
        (ModelCfg(name="resnet50"), "is a ResNet; phreg distills timm"),
        (ModelCfg(name="no_such_model"), "is not a timm model"),
        (ModelCfg(name="vit_smal_patch14_dinov2"), "is not a timm model; closest: vit_small_patch14_dinov2"),
        (ModelCfg(name=MODEL, checkpoint=str(tmp_path / "missing.safetensors")), "not found"),
        (ModelCfg(name=MODEL, checkpoint=str(text)), f"{text} is a text file, not weights (it starts 'these are"),
    ]
    for cfg, message in cases:
        with pytest.raises(UsageError) as e:
            load_teacher(cfg)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_loaders_refuse_a_spec_in_the_words_of_the_cli_checks(tmp_path):
    """`load_spec` / `load_teacher` without the CLI say what `phreg eval` / `phreg distill` say before torch loads."""
    from phreg.commands.distill import check as check_distill
    from phreg.config.recipe import load_recipe
    from phreg.models.names import check_model_spec
    from phreg.models.specs import load_spec

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("model: {name: vit_small_patch14_dinov2}\n")
    (tmp_path / "empty").mkdir()
    specs = [str(run), str(tmp_path / "empty"), str(tmp_path / "gone"), f"local-dir:{tmp_path / 'gone'}"]
    for spec in specs:
        with pytest.raises(UsageError) as preflight:
            check_model_spec(spec)
        with pytest.raises(UsageError) as loader:
            load_spec(spec)
        assert str(loader.value) == str(preflight.value), spec
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    for overrides in (["model.name=timm:vit_small_patch14_dinov2"], [f"model.name=local-dir:{tmp_path / 'gone'}"],
                      [f"model.checkpoint={tmp_path / 'gone.safetensors'}"]):
        r = load_recipe(recipe, [f"output_dir={tmp_path / 'out'}", *overrides])
        with pytest.raises(UsageError) as preflight:
            check_distill(r)
        with pytest.raises(UsageError) as loader:
            load_teacher(r.model)
        assert str(loader.value) == str(preflight.value), overrides


def test_a_file_that_is_not_weights_is_named_for_what_it_is(tmp_path, dinov2_file):
    """A CSV, a whole pickled model, a zip of something else, a truncated safetensors file: each is said to be what it
    is and what is expected, never torch's "retry with weights_only=False" (phreg has no such switch)."""
    import torch

    csv = tmp_path / "classes.csv"
    csv.write_text("name,id\nroad,0\nsky,1\n")
    whole = tmp_path / "whole.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, whole)  # a module object: weights_only=True refuses it
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, legacy, _use_new_zipfile_serialization=False)
    other = tmp_path / "photos.zip"
    import zipfile

    with zipfile.ZipFile(other, "w") as z:
        z.writestr("a.txt", "x")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(dinov2_file.read_bytes()[:5000])
    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes(range(256)) * 8)
    cases = [(csv, "is a text file, not weights (it starts 'name,id'); expected a .safetensors file"),
             (whole, "is a torch.save archive that holds more than tensors"),
             (legacy, "is a legacy torch.save (pickle) file that holds more than tensors"),
             (other, "is a zip archive but not a torch.save archive"),
             (cut, "is a damaged safetensors file"),
             (noise, "is neither safetensors nor a PyTorch archive (2048 bytes of other data)")]
    for file, message in cases:
        with pytest.raises(UsageError) as e:
            load_teacher(ModelCfg(name=MODEL, checkpoint=str(file), img_size=224))
        text = str(e.value)
        assert message in text and "weights_only=False" not in text and "\n" not in text, text
