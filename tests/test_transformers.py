"""The student in Hugging Face transformers: `Dinov2WithRegistersModel` computes timm's `forward_features` exactly.

Real DINOv2-S at the export's resolution and others, random reduced-depth L and g (SwiGLU) and a teacher with its own
registers, the refusal of other families, the image-processor config, and the CLI (`phreg export --format
transformers|both`, `phreg push --format transformers|both --dry-run`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import timm
import torch
import yaml
from conftest import MODEL
from PIL import Image

pytest.importorskip("transformers", minversion="4.48")
from transformers import AutoImageProcessor, AutoModel  # noqa: E402

from phreg.backbones import add_registers  # noqa: E402
from phreg.cli import main  # noqa: E402
from phreg.run.lock import LOCK_FILE  # noqa: E402
from phreg.data.scan import embedded_photos  # noqa: E402
from phreg.errors import UsageError  # noqa: E402
from phreg.hub.export import export_student  # noqa: E402
from phreg.hub.transformers import (FILES, TOLERANCE, check_exportable, export_transformers, hf_config, max_difference,
                                    processor_config)
from phreg.config.recipe import load_recipe, save_recipe  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at a scale where each one shows in the output (timm's init starts LayerScale at 1e-5,
    which would hide a wrong block mapping below the tolerance)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 1.0))
    return model.eval()


def timm_export(student, folder: Path) -> torch.nn.Module:
    """The student as phreg exports it for timm, loaded back as a user would."""
    export_student(student, folder, MEAN, STD, {})
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


def hf(folder: Path):
    return AutoModel.from_pretrained(str(folder)).eval()


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


# ------------------------------------------------------------------------------------------------ exactness

@pytest.fixture(scope="module")
def dinov2_s(teacher224, tmp_path_factory):
    """Real DINOv2-S with 16 registers at 224 px: the timm export, and its transformers export."""
    folder = tmp_path_factory.mktemp("dinov2_s")
    model = timm_export(add_registers(teacher224, 16), folder / "timm")
    check = export_transformers(model, folder / "hf")
    return model, folder, check


def test_real_dinov2_s_equals_timm_at_the_export_resolution(dinov2_s, teacher224, photos):
    model, folder, check = dinov2_s
    assert teacher224.no_embed_class is False  # the class token's position entry is folded into the student's token
    assert sorted(p.name for p in (folder / "hf").iterdir()) == sorted(FILES)
    loaded = hf(folder / "hf")
    assert type(loaded).__name__ == "Dinov2WithRegistersModel" and loaded.config.num_register_tokens == 16
    assert loaded.config.image_size == 224 and loaded.config.layer_norm_eps == 1e-6
    assert check["max_diff"] < TOLERANCE and check["registers"] == 16
    assert max_difference(model, loaded, photos) < TOLERANCE  # four real CamVid frames
    with safetensors.safe_open(str(folder / "hf" / "model.safetensors"), "pt") as f:
        pos, cls = f.get_tensor("embeddings.position_embeddings"), f.get_tensor("embeddings.cls_token")
    assert pos.shape == (1, 1 + 256, 384) and not pos[:, 0].any()  # the class entry lives in the token
    assert torch.equal(cls, model.cls_token.detach())


@pytest.mark.parametrize("size", [(518, 518), (112, 112), (224, 336)])
def test_other_resolutions_resample_alike_in_both_libraries(dinov2_s, size):
    """Both libraries resample only the patch grid of the position embedding, with F.interpolate(bicubic,
    antialias=True, align_corners=False) to the new grid: the same float32 result, so no difference beyond rounding.
    A resampler without antialias (transformers' Dinov2Model, DINOv2 without registers) would differ when the grid
    shrinks: shown at 112 px, so this test can see a resampling difference."""
    model, folder, _ = dinov2_s
    dynamic = timm.create_model(f"local-dir:{folder / 'timm'}", pretrained=True, dynamic_img_size=True).eval()
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    loaded = hf(folder / "hf")
    assert max_difference(dynamic, loaded, x) < TOLERANCE
    if size == (112, 112):
        from timm.layers import resample_abs_pos_embed

        small = timm.create_model(f"local-dir:{folder / 'timm'}", pretrained=True, img_size=112).eval()
        assert max_difference(small, loaded, x) < TOLERANCE  # timm's load-time resampling is the same one
        with torch.no_grad():
            small.pos_embed.copy_(resample_abs_pos_embed(model.pos_embed, [8, 8], num_prefix_tokens=0,
                                                         antialias=False))
        assert max_difference(small, loaded, x) > 1e-2


@pytest.mark.parametrize("name,size,registers", [
    ("vit_base_patch14_dinov2", 42, 16),
    ("vit_large_patch14_dinov2", 42, 16),
    ("vit_giant_patch14_dinov2", 28, 4),  # SwiGLU
    ("vit_small_patch14_reg4_dinov2", 42, 4),  # 4 registers of its own + 4
])
def test_random_reduced_depth_shapes_are_exact(name, size, registers, tmp_path):
    teacher = randomized(timm.create_model(name, pretrained=False, depth=2, img_size=size))
    model = timm_export(add_registers(teacher, registers), tmp_path / "timm")
    check = export_transformers(model, tmp_path / "hf")
    loaded = hf(tmp_path / "hf")
    c = loaded.config
    total = registers + (4 if "reg4" in name else 0)
    assert c.num_register_tokens == total == model.num_reg_tokens and c.hidden_size == model.embed_dim
    assert c.num_hidden_layers == 2 and c.mlp_ratio == 4 and c.use_swiglu_ffn == ("giant" in name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    assert max_difference(model, loaded, x) < TOLERANCE and check["max_diff"] < TOLERANCE
    if "giant" in name:  # the split order of timm's packed SwiGLU matters, and this test would see it swapped
        sd = safetensors.torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
        for k in [k for k in sd if ".mlp.weights_in." in k]:
            gate, up = sd[k].chunk(2)
            sd[k] = torch.cat([up, gate])
        safetensors.torch.save_file(sd, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
        assert max_difference(model, hf(tmp_path / "hf"), x) > 1e-2


def test_bf16_weights_convert_exactly_and_compute_the_fp32_student_to_bf16_rounding(tmp_path):
    """A bf16 timm export converts to bf16 transformers weights holding the same values: the self-check (float32 on
    both sides) keeps float32's tolerance, config.json's torch_dtype says bfloat16, and transformers' features are the
    fp32 student's to a relative error under 2 x bf16's epsilon (2^-6)."""
    teacher = randomized(timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=2, img_size=28))
    student = add_registers(teacher, 4).eval()
    export_student(student, tmp_path / "timm", MEAN, STD, {}, dtype=torch.bfloat16)
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    check = export_transformers(model, tmp_path / "hf", dtype=torch.bfloat16)
    assert check["max_diff"] < TOLERANCE and check["dtype"] == "bfloat16"
    weights = tmp_path / "hf" / "model.safetensors"
    with safetensors.safe_open(str(weights), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"} and f.metadata()["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = AutoModel.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    assert max_difference(model, loaded, x) < TOLERANCE
    with torch.no_grad():
        want, got = student.forward_features(x), loaded(pixel_values=x).last_hidden_state
    assert 0 < ((got - want).norm() / want.norm()).item() < 2 * torch.finfo(torch.bfloat16).eps
    # from the fp32 student itself: the same bytes, and the self-check compares it rounded as stored
    direct = export_transformers(student, tmp_path / "hf2", dtype=torch.bfloat16)
    assert direct["max_diff"] < TOLERANCE and (tmp_path / "hf2" / "model.safetensors").read_bytes() == \
        weights.read_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_export_that_does_not_match_timm_is_not_written(tmp_path, monkeypatch, dtype):
    """The self-check: a conversion gone wrong (here: the LayerScale of block 1 swapped) stops with one line and
    leaves no folder behind, bf16 weights included."""
    import phreg.hub.transformers as hub_transformers
    from phreg.errors import Aborted

    teacher = randomized(timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=2, img_size=28))
    model = timm_export(add_registers(teacher, 4), tmp_path / "timm")
    convert = hub_transformers.convert_state

    def wrong(sd, depth):
        out = convert(sd, depth)
        a, b = "encoder.layer.1.layer_scale1.lambda1", "encoder.layer.1.layer_scale2.lambda1"
        out[a], out[b] = out[b], out[a]
        return out

    monkeypatch.setattr(hub_transformers, "convert_state", wrong)
    with pytest.raises(Aborted, match=r"differs from the timm student by .* at 28 px; nothing written"):
        export_transformers(model, tmp_path / "hf", dtype=dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timm"]


@pytest.mark.parametrize("name,why", [
    ("eva02_small_patch14_224.mim_in22k", "rotary position embeddings"),
    ("vit_base_patch16_siglip_224", "no class token"),
    ("vit_base_patch16_clip_224.openai", "CLIP's ln_pre"),
    ("deit3_small_patch16_224", "is not a DINOv2"),
])
def test_other_families_are_refused_in_one_line(name, why):
    student = timm.create_model(name, pretrained=False, depth=1, device="meta", reg_tokens=4, no_embed_class=True) \
        if not name.startswith("eva") else timm.create_model(name, pretrained=False, depth=1, device="meta")
    with pytest.raises(UsageError) as e:
        check_exportable(student, name, "runs/x")
    text = str(e.value)
    assert text.startswith(f"no transformers export of {name}: ") and why in text and "\n" not in text
    assert "use the timm export" in text
    assert ("cannot compute it exactly" in text) == (not name.startswith("deit3"))  # DeiT-III would; it is no DINOv2
    assert "timm.create_model('local-dir:runs/x/export', pretrained=True)" in text


# ------------------------------------------------------------------------------------------------ image processor

def test_image_processor_config_is_the_runs_preprocessing(dinov2_s):
    model, folder, _ = dinov2_s
    saved = json.loads((folder / "hf" / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "BitImageProcessor"
    assert saved["size"] == {"shortest_edge": 224} and saved["crop_size"] == {"height": 224, "width": 224}
    assert saved["image_mean"] == list(MEAN) and saved["image_std"] == list(STD) and saved["resample"] == 3
    assert saved["do_rescale"] and saved["rescale_factor"] == 1 / 255 and saved["do_center_crop"]
    cfg = dict(input_size=(3, 448, 448), crop_pct=0.875, crop_mode="center", interpolation="bilinear",
               mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    other = processor_config(cfg)
    assert other["size"] == {"shortest_edge": 512} and other["resample"] == 2 and other["image_std"] == [0.25] * 3
    assert processor_config(dict(cfg, crop_mode="squash"))["size"] == {"height": 512, "width": 512}
    # what timm's own eval transform makes of a photo, up to the resize backend (PIL vs torchvision)
    photo = Image.open(embedded_photos() / "chelsea.png").convert("RGB")
    ours = AutoImageProcessor.from_pretrained(str(folder / "hf"))(images=photo, return_tensors="pt")["pixel_values"]
    data = timm.data.resolve_data_config({}, model=model)
    theirs = timm.data.create_transform(**data)(photo)[None]
    assert ours.shape == theirs.shape == (1, 3, 224, 224) and (ours - theirs).abs().max().item() < 0.05


# ------------------------------------------------------------------------------------------------ command line

@pytest.fixture(scope="module")
def run(tmp_path_factory, dinov2_file) -> Path:
    """A finished tiny run (DINOv2-S at 56 px, 4 registers, 2 steps). Tests must only read it."""
    from accelerate.state import AcceleratorState, GradientState

    from phreg.distill.loop import distill

    folder = tmp_path_factory.mktemp("transformers") / "run"
    recipe = load_recipe(None, [f"output_dir={folder}", f"model.name={MODEL}", f"model.checkpoint={dinov2_file}",
                                "model.img_size=56", "model.registers=4", "views.num=2", "data.num_workers=0",
                                "train.batch_size=2", "train.max_steps=2", "train.save_every=0"])
    AcceleratorState._reset_state(True)
    try:
        distill(recipe, quiet=True)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return folder


@pytest.mark.slow
def test_cli_export_format_transformers(run, tmp_path, capsys):
    before = tree(run)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "transformers", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert re.search(r"exported .*hf in [\d.]+s: transformers Dinov2WithRegistersModel, 4 registers; "
                     r"last_hidden_state = timm forward_features to max \|diff\| \S+ at 56 px", said), said
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # the temporary timm export is gone
    assert tree(run) == before  # RUN/export is neither rebuilt nor touched
    timm_model = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    assert max_difference(timm_model, hf(out), x) < TOLERANCE
    with safetensors.safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["registers"] == "4" and meta["steps"] == "2" and "recipe_hash" in meta
    config = json.loads((out / "config.json").read_text())
    assert config == hf_config(timm_model)
    first = (out / "model.safetensors").read_bytes()
    assert main(["export", str(run), "--format", "transformers", "--out", str(out)]) == 0  # replaces its own
    assert (out / "model.safetensors").read_bytes() == first  # and writes the same bytes


@pytest.mark.slow
def test_cli_export_format_both(run, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", str(run), "--format", "both", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"exported {out} (timm)" in said and f"exported {out}-transformers in" in said, said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "exp-transformers"]
    assert tree(out) == tree(run / "export")  # the finished run's export, rebuilt byte for byte
    assert sorted(p.name for p in (tmp_path / "exp-transformers").iterdir()) == sorted(FILES)


@pytest.mark.slow
def test_cli_export_both_as_bf16_and_push_keeps_the_exports_dtype(run, tmp_path, capsys):
    """`--dtype bf16 --format both`: both folders hold bf16 weights, the transformers ones the timm ones' values; a
    push of that export converts it to transformers in bf16 too (push uploads what export wrote)."""
    out = tmp_path / "exp"
    assert main(["export", str(run), "--format", "both", "--dtype", "bf16", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert re.search(r"to max \|diff\| 0\.0e\+00 at 56 px", said), said
    dtypes = {}
    for folder in (out, tmp_path / "exp-transformers"):
        with safetensors.safe_open(str(folder / "model.safetensors"), "pt") as f:
            dtypes[folder.name] = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"exp": {"BF16"}, "exp-transformers": {"BF16"}}
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("recipe.yaml", "summary.json"):
        (copy / name).write_bytes((run / name).read_bytes())
    os.symlink(out, copy / "export")
    hub = tmp_path / "hub"
    assert main(["push", str(copy), "--repo-id", "alice/bf16", "--dry-run", str(hub), "--format", "transformers"]) == 0
    assert (hub / "model.safetensors").read_bytes() == (tmp_path / "exp-transformers" / "model.safetensors").read_bytes()
    assert "both computing in float32 from the stored bfloat16 weights" in (hub / "README.md").read_text()


def test_cli_refusals_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, monkeypatch):
    clip = tmp_path / "cliprun"
    save_recipe(load_recipe(None, ["model.name=vit_base_patch16_clip_224.openai", f"output_dir={clip}"]),
                clip / "recipe.yaml")
    assert main(["export", str(clip), "--format", "transformers", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot compute it exactly" in err and "use the timm export" in err, err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in clip.iterdir() if p.name != LOCK_FILE) == ["recipe.yaml"]
    assert main(["export", str(clip), "--format", "both"]) == 2  # refused before the timm export is written too
    assert "cannot compute it exactly" in capsys.readouterr().err
    assert sorted(p.name for p in clip.iterdir() if p.name != LOCK_FILE) == ["recipe.yaml"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["export", str(clip), "--format", "transformers", "--out", str(tmp_path / "mine")]) == 2
    assert "refusing to replace" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").is_file()
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    assert main(["export", str(clip), "--format", "transformers"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "phreg: error: the transformers format needs Hugging Face transformers>=4.48: " \
                  "pip install 'phreg[transformers]'"


def card(folder: Path) -> tuple[dict, str]:
    _, front, body = (folder / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(front), body


def run_snippet(body: str, marker: str, repo: str, local: Path) -> dict:
    code = next(c for c in re.findall(r"```python\n(.*?)```", body, re.S) if marker in c)
    code = code.replace(f'"{repo}"', f'"{local}"').replace("image.jpg", str(embedded_photos() / "chelsea.png"))
    scope: dict = {}
    exec(code, scope)
    return scope


@pytest.mark.slow
def test_cli_push_dry_run_both_formats_in_one_repository(run, tmp_path):
    repo, out = "alice/dinov2-small-reg4", tmp_path / "hub"
    args = ["push", str(run), "--repo-id", repo, "--dry-run", str(out), "--format", "both"]
    assert main(args) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(
        ["README.md", "config.json", "model.safetensors", "recipe.yaml"] + [f"transformers/{n}" for n in FILES])
    assert (out / "model.safetensors").read_bytes() == (run / "export" / "model.safetensors").read_bytes()
    front, body = card(out)
    assert front["library_name"] == "timm" and {"timm", "transformers"} <= set(front["tags"])
    assert f'timm.create_model("hf-hub:{repo}", pretrained=True)' in body
    assert f'AutoModel.from_pretrained("{repo}", subfolder="transformers")' in body
    assert "`transformers/model.safetensors`, `transformers/config.json`, `transformers/preprocessor_config.json`" \
        in body
    # the card's snippet as a user runs it, Hub id and subfolder unchanged: the upload sits in a huggingface_hub cache
    # (offline), which is where from_pretrained finds a downloaded repository
    revision = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "cache" / "models--alice--dinov2-small-reg4"
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(revision)
    for f in (p for p in out.rglob("*") if p.is_file()):
        (cache / "snapshots" / revision / f.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
        (cache / "snapshots" / revision / f.relative_to(out)).symlink_to(f)
    code = next(c for c in re.findall(r"```python\n(.*?)```", body, re.S) if "AutoModel" in c)
    code = code.replace("image.jpg", str(embedded_photos() / "chelsea.png")) + "\nprint(tuple(tokens.shape))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=dict(os.environ, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1"))
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "(1, 21, 384)", done.stderr[-2000:]
    assert main(args) == 0  # a second dry run replaces the first, subfolder included


@pytest.mark.slow
def test_cli_push_dry_run_transformers_only(run, tmp_path):
    repo, out = "alice/dinov2-small-reg4", tmp_path / "hub"
    assert main(["push", str(run), "--repo-id", repo, "--dry-run", str(out), "--format", "transformers"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", "recipe.yaml", *FILES])
    assert json.loads((out / "config.json").read_text())["model_type"] == "dinov2_with_registers"
    front, body = card(out)
    assert front["library_name"] == "transformers" and "timm" not in front["tags"]
    assert "stock Hugging Face transformers `Dinov2WithRegistersModel` (4 registers)" in body
    assert "timm.create_model" not in body and "subfolder" not in body
    scope = run_snippet(body, "AutoModel", repo, out)
    timm_model = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
    with torch.no_grad():  # the card's snippet gives timm's tokens for the same pixels
        want = timm_model.forward_features(scope["inputs"]["pixel_values"])
    assert (scope["tokens"] - want).abs().max().item() < TOLERANCE


@pytest.mark.slow
def test_cli_push_both_formats_is_one_commit_of_the_dry_run_folder(run, tmp_path):
    """Through a stand-in Hub: the commit holds the timm files at the root and the transformers files under
    transformers/, the bytes of the dry run."""
    from test_publish import StandInHub, assert_no_token, phreg_push

    out = tmp_path / "hub"
    assert main(["push", str(run), "--repo-id", "alice/both", "--dry-run", str(out), "--format", "both"]) == 0
    with StandInHub() as hub:
        result = phreg_push(run, hub.url, tmp_path / "home", "--repo-id", "alice/both", "--format", "both")
    assert result.returncode == 0, result.stderr
    (commit,) = hub.commits
    lines = [json.loads(line) for line in commit["body"].decode().splitlines()]
    sent = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines[1:] if v["key"] == "file"}
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert sorted(sent) == files and "transformers/model.safetensors" in sent
    assert all(sent[name] == (out / name).read_bytes() for name in files)
    assert_no_token(result.stdout, result.stderr)
