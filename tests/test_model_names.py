"""The names people type for a model: torch.hub's DINOv2 / DINOv3 names, open_clip's `MODEL:PRETRAINED` pairs and
Hugging Face CLIP ids are aliases of timm models (`phreg.models.names.MODEL_ALIASES`), said once; a name that is
neither gets the closest timm names and aliases."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
from conftest import MODEL

from phreg.cli import main
from phreg.errors import UsageError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

WIDTHS = {"s": 384, "splus": 384, "b": 768, "l": 1024, "g": 1536, "hplus": 1280, "7b": 4096,  # DINO
          "B": 768, "L": 1024, "H": 1280, "bigG": 1664, "base": 768, "large": 1024}  # CLIP
CLIP_NAME = re.compile(r"vit-(base|large|B|L|H|bigG)-(?:patch)?(\d+)(?:-(\d{3}))?", re.I)


def expected(alias: str) -> dict:
    """What the network an alias names looks like, read off the alias itself (its authors' naming scheme)."""
    if m := re.fullmatch(r"dinov2_vit([sblg])(14)(_reg)?", alias):
        return dict(width=WIDTHS[m[1]], patch=14, registers=4 if m[3] else 0)
    if m := re.fullmatch(r"dinov3_vit(s|splus|b|l|hplus|7b)(16)", alias.replace("16plus", "plus16")):
        return dict(width=WIDTHS[m[1]], patch=16)
    m = CLIP_NAME.search(alias)
    assert m, alias
    width = WIDTHS.get(m[1]) or WIDTHS[m[1].lower()]
    return dict(width=width, patch=int(m[2]), size=int(m[3]) if m[3] else 224)


def test_every_alias_is_a_timm_model_with_the_aliased_geometry():
    from phreg.models.names import MODEL_ALIASES

    pretrained = set(timm.list_models(pretrained=True))
    for alias, target in MODEL_ALIASES.items():
        assert timm.is_model(target), (alias, target)
        if "." in target:  # weights named by a tag: timm must hold exactly those
            assert target in pretrained, (alias, target)
        model = timm.create_model(target, pretrained=False, device="meta", depth=1)
        want = expected(alias)
        assert model.patch_embed.patch_size == (want["patch"],) * 2, alias
        assert model.embed_dim == want["width"], alias
        if "size" in want:
            assert model.patch_embed.img_size == (want["size"],) * 2, alias
        if "registers" in want:
            assert model.num_reg_tokens == want["registers"], alias


def test_open_clip_pairs_are_open_clips_own_with_its_activation():
    """Each `MODEL:PRETRAINED` alias is a pair open_clip lists, and its timm target uses QuickGELU exactly where those
    weights were trained with it (open_clip's pretrained config, or a `-quickgelu` model name)."""
    import open_clip

    from phreg.models.names import MODEL_ALIASES

    listed = set(open_clip.list_pretrained(as_str=True))
    for alias, target in MODEL_ALIASES.items():
        if ":" not in alias:
            continue
        assert alias in listed, alias
        name, tag = alias.split(":")
        quick = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu")) or "quickgelu" in name
        act = timm.create_model(target, pretrained=False, device="meta", depth=1).blocks[0].mlp.act
        assert (type(act).__name__ == "QuickGELU") == quick, alias


def test_an_alias_is_said_once_and_a_folder_of_that_name_wins(tmp_path, monkeypatch, capsys):
    from phreg.models.names import timm_name

    assert timm_name("dinov2_vits14") == "vit_small_patch14_dinov2"
    assert timm_name("OpenAI/CLIP-ViT-Base-Patch16", "--teacher") == "vit_base_patch16_clip_quickgelu_224.openai"
    assert capsys.readouterr().err.splitlines() == [
        "model.name dinov2_vits14 is timm's vit_small_patch14_dinov2",
        "--teacher OpenAI/CLIP-ViT-Base-Patch16 is timm's vit_base_patch16_clip_quickgelu_224.openai"]
    assert timm_name(MODEL) == MODEL and capsys.readouterr().err == ""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dinov2_vits14").mkdir()  # a folder the user named so: a path, not an alias
    assert timm_name("dinov2_vits14") == "dinov2_vits14"


def test_distill_takes_the_torch_hub_name_and_says_it_once(tmp_path, capsys, dinov2_file):
    """`model.name=dinov2_vits14` used to stop with `is not a timm model`. Here the run goes as far as the first check
    that needs the model (the patch grid of a 14 px image), which only timm's name passes."""
    code = main(["distill", str(RECIPES / "quickstart.yaml"), "model.name=dinov2_vits14",
                 f"model.checkpoint={dinov2_file}", "model.img_size=14", f"output_dir={tmp_path / 'run'}", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("model.name dinov2_vits14 is timm's vit_small_patch14_dinov2") == 1, err
    assert "1x1 patch grid (patch 14)" in err and "is not a timm model" not in err


def test_estimate_takes_an_alias(capsys):
    assert main(["estimate", str(RECIPES / "dinov2_vitb14.yaml"), "model.name=dinov2_vitl14"]) == 0
    out, err = capsys.readouterr()
    assert err == "model.name dinov2_vitl14 is timm's vit_large_patch14_dinov2\n" and "GB" in out


def test_eval_and_inspect_load_an_alias_as_its_timm_model(dinov2_file):
    from phreg.models.specs import load_spec

    loaded = load_spec("dinov2_vits14", 28, str(dinov2_file))
    assert loaded.name == MODEL and type(loaded.model).__name__ == "VisionTransformer"


@pytest.mark.parametrize("args, message", [
    (["inspect", "dinov2_vits41"], "'dinov2_vits41' is not a timm model; closest: dinov2_vits14"),
    (["inspect", "openai/clip-vit-base-patch61"],
     "openai/clip-vit-base-patch61: no such folder, nor a model name; closest: openai/clip-vit-base-patch16"),
])
def test_a_name_that_is_neither_gets_the_closest_names_and_aliases(tmp_path, capsys, args, message):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "a.png")
    assert main([*args, "--images", str(images)]) == 2
    assert message in capsys.readouterr().err


def test_a_misspelt_open_clip_pair_is_pointed_at_the_right_one():
    from phreg.models.names import check_model_name, unknown_model

    with pytest.raises(UsageError, match=r"closest: ViT-B-16:openai"):
        check_model_name("ViT-B-16:opnai")
    assert "closest: dinov2_vitb14" in str(unknown_model("dinov2_vitb41", "model.name"))
