"""Recipes are plain data checked against types: bad ones are one clear line naming the key."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from phreg.config.recipe import Recipe, load_recipe, recipe_hash, to_dict
from phreg.errors import UsageError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def keys(d: dict, prefix="") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= keys(v, prefix + k + ".")
    return out


def test_the_promised_recipes_exist():
    assert {p.stem for p in RECIPES} >= {"quickstart", "dinov2_vits14", "dinov2_vitb14", "clip_vitb16", "deit3_b16",
                                        "siglip_b16", "eva02_b14", "dinov3_b16", "dinov2_vitl14", "dinov2_vitg14"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_spells_out_every_key(path):
    recipe = load_recipe(path)
    raw = yaml.safe_load(path.read_text())
    assert keys(raw) == keys(to_dict(recipe))
    for line in path.read_text().splitlines():  # every key line carries a comment
        if re.match(r"^\s*[A-Za-z_]+:", line):
            assert "#" in line, f"{path.name}: key without a comment: {line.strip()}"


def test_paper_recipes_follow_the_paper():
    b = load_recipe(Path(RECIPES[0]).parent / "dinov2_vitb14.yaml")
    got = (b.model.img_size, b.views.num, b.model.registers, b.train.batch_size, b.train.epochs)
    assert got == (518, 10, 16, 8, 100)
    assert (b.train.lr, b.train.end_lr, b.train.weight_decay, b.cache.enabled) == (1e-4, 5e-6, 1e-2, False)
    c = load_recipe(Path(RECIPES[0]).parent / "clip_vitb16.yaml")
    assert (c.model.img_size, c.train.lr, c.train.end_lr, c.train.batch_size, c.views.fill) == (448, 3e-4, 1e-5, 16,
                                                                                               "white")
    assert c.model.mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_overrides_are_typed_yaml():
    r = load_recipe(None, ["train.lr=3e-4", "views.fill=[1, 0.5, 0]", "model.checkpoint=null", "output_dir=x",
                           "train.unlock=[{params: [pos_embed], lr_scale: 2}]"])
    assert r.train.lr == 3e-4 and r.views.fill == [1, 0.5, 0] and r.model.checkpoint is None
    assert r.train.unlock[0].params == ["pos_embed"] and r.train.unlock[0].lr_scale == 2.0
    assert isinstance(r.train.lr, float)


@pytest.mark.parametrize("override,message", [
    ("train.epoch=3", "unknown recipe key train.epoch (did you mean train.epochs?)"),
    ("train.lerning_rate=3", "unknown recipe key train.lerning_rate (did you mean train.lr?)"),
    ("data.rot=x", "unknown recipe key data.rot (did you mean data.root?)"),
    ("export.head=none", "recipe key export.head: expected one of drop, keep"),
    ("export.dtype=fp8", "recipe key export.dtype: expected one of auto, fp32, bf16, fp16"),
    ("modle.name=x", "unknown recipe key modle"),
    ("train.lr=fast", "recipe key train.lr: expected a number, got 'fast'"),
    ("train.epochs=1.5", "recipe key train.epochs: expected an integer"),
    ("train.epochs=true", "recipe key train.epochs: expected an integer"),
    ("train.batch_size=0", "recipe key train.batch_size: must be >= 1"),
    ("views.max_shift=0.9", "recipe key views.max_shift: must be <= 0.5"),
    ("train.schedule=linear", "recipe key train.schedule: expected one of exp, cosine, constant"),
    ("views.fill=pink", "recipe key views.fill: expected one of white, black, mean"),
    ("train.end_lr=1", "recipe key train.end_lr: 1.0 is above train.lr"),
    ("train.unlock=[{params: [pos_embed], lr: 1}]", "unknown recipe key train.unlock[0].lr"),
    ("model=3", "recipe key model: expected a mapping"),
    ("nokey", "override 'nokey': expected key=value"),
])
def test_bad_recipes_name_the_key(override, message):
    with pytest.raises(UsageError) as e:
        load_recipe(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unreadable_recipe_files(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "tab.yaml").write_text("train:\n\tlr: 1\n")
    with pytest.raises(UsageError, match=r"found character '\\t' that cannot start any token \(line 2, column 1\)"):
        load_recipe(tmp_path / "tab.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_tilde_is_expanded_in_every_path_key(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    r = load_recipe(None, ["output_dir=~/runs/a", "data.root=~/photos", "data.val_root=~/val", "cache.dir=~/cache",
                           "model.checkpoint=~/w.safetensors"])
    assert (r.output_dir, r.data.root, r.data.val_root, r.cache.dir, r.model.checkpoint) == (
        "/home/someone/runs/a", "/home/someone/photos", "/home/someone/val", "/home/someone/cache",
        "/home/someone/w.safetensors")
    assert load_recipe(None, ["model.name=local-dir:~/export"]).model.name == "local-dir:/home/someone/export"


def test_hash_ignores_output_dir_only():
    a, b = load_recipe(None, ["output_dir=a"]), load_recipe(None, ["output_dir=b"])
    assert recipe_hash(a) == recipe_hash(b)
    assert recipe_hash(a) != recipe_hash(load_recipe(None, ["seed=1"]))
    assert dataclasses.asdict(Recipe()) == to_dict(load_recipe(None))


def test_export_dtype_auto_is_the_frozen_weights_dtype():
    """auto: bf16 for the one recipe that holds its frozen weights in bf16 (DINOv3 ViT-7B), fp32 for every other;
    `--dtype` (the `choice`) wins over the recipe."""
    import torch

    from phreg.hub.export import export_dtype

    auto = {p.stem: export_dtype(load_recipe(p)) for p in RECIPES}
    assert {k for k, v in auto.items() if v == torch.bfloat16} == {"dinov3_vit7b16"}
    assert set(auto.values()) == {torch.float32, torch.bfloat16}
    bf16 = ["speed.frozen_dtype=bf16", "train.precision=bf16"]
    assert export_dtype(load_recipe(None, bf16)) == torch.bfloat16
    assert export_dtype(load_recipe(None, [*bf16, "export.dtype=fp32"])) == torch.float32
    assert export_dtype(load_recipe(None, ["export.dtype=fp16"])) == torch.float16
    assert export_dtype(load_recipe(None, ["export.dtype=fp16"]), "bf16") == torch.bfloat16
    assert export_dtype(load_recipe(None, bf16), "auto") == torch.bfloat16


def test_clip_recipes_read_naclip_targets_and_train_the_maskclip_output():
    for name in ("clip_vitb16", "openclip_vitb16", "evaclip_vitb16", "siglip_vitb16"):
        r = load_recipe(Path(RECIPES[0]).parent / f"{name}.yaml")
        assert (r.model.teacher_head, r.model.student_head, r.model.img_size) == ("naclip", "maskclip", 448)
        assert r.model.text_model and r.model.text_pretrained and (r.train.lr, r.train.end_lr) == (3e-4, 1e-5)
        assert r.train.batch_size == 16 and "blocks.-2.*" in r.train.unlock[1].params


def test_views_tap_of_older_recipes_becomes_both_heads():
    r = load_recipe(None, ["views.tap=last_block"])
    assert (r.model.teacher_head, r.model.student_head) == ("last_block", "last_block")
    with pytest.raises(UsageError, match="model.student_head"):
        load_recipe(None, ["model.student_head=cls"])
