"""What a new user hits: mistakes answered in about a second, one line each; offline lookup in one line;
label masks under data.root; a readable console; the export's classifier head. (The model card as a record of the
run: tests/test_publish.py.)"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import yaml
from conftest import MODEL, fake_run, one_line, phreg, random_weights, tiny
from PIL import Image

from phreg.cli import main
from phreg.data.scan import scan_images
from phreg.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def photos_and_masks(root: Path, n: int = 4, bad_id: int | None = None) -> tuple[Path, Path]:
    """n random RGB photos in root/images, their label masks (ids 0..2, plus `bad_id` in the last) in root/masks."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(root / "images" / f"f{i}.png")
        mask = rng.integers(0, 3, (32, 48)).astype(np.uint8)
        if bad_id is not None and i == n - 1:
            mask[0, 0] = bad_id
        Image.fromarray(mask, "L").save(root / "masks" / f"f{i}.png")
    return root / "images", root / "masks"


# ------------------------------------------------------------------------------- 1, 4, 5: mistakes answer at once

def test_usage_mistakes_answer_in_seconds_with_one_line(tmp_path):
    images, masks = photos_and_masks(tmp_path / "data", bad_id=11)
    run = fake_run(tmp_path / "run", export_step=1, recipe="{}\n")
    (tmp_path / "tab.yaml").write_text("train:\n\tlr: 1\n")
    cases = [
        (["distill", REPO / "phreg" / "photos" / "chelsea.png"], "is not a YAML text file (it is a PNG image)"),
        (["distill", tmp_path / "tab.yaml"], "found character '\\t' that cannot start any token (line 2, column 1)"),
        (["distill", QUICKSTART, "train.lerning_rate=1e-4"], "unknown recipe key train.lerning_rate (did you mean train.lr?)"),
        (["distill", QUICKSTART, "data.root=~/no-such-photos-folder"], f"data.root: image folder {Path.home()}/no-such"),
        (["distill", QUICKSTART, f"data.val_root={tmp_path / 'nope'}"], "data.val_root: image folder"),
        (["eval", "--student", run, "--images", images, "--masks", masks, "--num-classes", "3"],
         "mask f3.png has class ids outside 0..2 (ignore index None): [11]; if 11 marks unlabelled pixels pass "
         "--ignore-index 11"),
        (["eval", "--student", run, "--images", images, "--masks", masks], "--masks needs --num-classes"),
        (["eval", "--student", run, "--images", images, "--masks", masks, "--num-classes", "3",
          "--ignore-index", "11", "--split", masks / "f0.png"], "--split"),
        (["inspect", MODEL, "--images", tmp_path / "nope"], "--images: image folder"),
        (["export", tmp_path / "nope"], "is not a phreg run folder"),
        (["push", run, "--repo-id", "no-owner", "--dry-run", tmp_path / "hub"], "--repo-id 'no-owner': expected OWNER/NAME"),
    ]
    for args, message in cases:
        out = phreg(*args)
        one_line(out, 2, message)
        assert out.seconds < 5, (args, out.seconds)  # ~0.3 s here: no torch, no model before these checks


# ------------------------------------------------------------------------------------------ 3: offline, one line

@pytest.mark.parametrize("env,reason", [
    (dict(HF_ENDPOINT="http://127.0.0.1:9"), "cannot reach 127.0.0.1"),  # no hub answers (port 9: discard, closed)
    (dict(HF_HUB_OFFLINE="1"), "HF_HUB_OFFLINE is set"),
])
@pytest.mark.slow
def test_missing_weights_offline_fail_fast_in_one_line(tmp_path, env, reason):
    out = phreg("distill", QUICKSTART, f"output_dir={tmp_path / 'run'}",
                         env=dict(env, HF_HOME=str(tmp_path / "hf"), PHREG_CHECKPOINTS=str(tmp_path / "none")),
                         drop=() if "HF_HUB_OFFLINE" in env else ("HF_HUB_OFFLINE",))
    one_line(out, 2, f"no weights for {MODEL} ({reason}, nothing cached): pass model.checkpoint=FILE or put the "
                     f"file at {tmp_path / 'none' / MODEL}.safetensors")
    assert out.stdout == "" and out.seconds < 20, out.seconds  # fails fast: no network retries
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------- 7: masks under data.root

def test_label_masks_under_data_root_are_skipped_with_one_line(tmp_path, caplog):
    photos_and_masks(tmp_path / "root", n=3)
    with caplog.at_level(logging.WARNING, logger="phreg"):
        usable, bad = scan_images(tmp_path / "root", "data.root")
    assert [p.parent.name for p in usable] == ["images"] * 3 and bad == []
    assert [r.getMessage() for r in caplog.records] == [
        f"data.root: skipped 3 single-channel label masks under {tmp_path / 'root'} (in masks); using 3 photos"]
    with pytest.raises(UsageError, match="data.root: all 3 images under .* are single-channel label masks"):
        scan_images(tmp_path / "root" / "masks", "data.root")
    grey = tmp_path / "grey"  # a grey-level photo has many values: it is a photo, not a mask
    grey.mkdir()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64).astype(np.uint8), "L").save(grey / "g.png")
    assert len(scan_images(grey)[0]) == 1


# ----------------------------------------------------------------------------------------------- 8: --help

def test_help_never_breaks_inside_a_word():
    for command in ("push", "inspect", "eval", "distill"):
        out = phreg(command, "--help", env=dict(COLUMNS="60"))
        assert out.returncode == 0
        assert not re.search(r"\w-\n", out.stdout), out.stdout  # was `--dry-\nrun`, `hf-\nhub:ID`
        assert "--dry-run" in out.stdout or command != "push"


# --------------------------------------------------------------------------- 2, 9: console, classifier head

@pytest.mark.slow
def test_deit3_export_drops_its_head_by_default_and_keeps_it_on_request(tmp_path):
    name = "deit3_small_patch16_224"
    run = tmp_path / "run"
    out = phreg("distill", QUICKSTART, *tiny(run, name, random_weights(name, tmp_path / "deit3.safetensors"), 32),
                   "train.eval_every=1")
    assert out.returncode == 0, out.stderr
    console = re.split(r"[\r\n]", out.stdout + out.stderr)
    assert any(line.startswith("step 1: held-out mean 1-cos") for line in console), console  # own line, not glued
    assert any("precision fp32" in line for line in console)
    done = next(line for line in console if line.startswith("exported "))
    assert re.fullmatch(r"exported .* in [\d.]+s; the run took \d+s: caching teacher targets \d+s, training \d+s, "
                        r"setup and the rest \d+s", done), done
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["num_classes"] == 0
    with safetensors.safe_open(str(run / "export" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("head.") for k in f.keys())
    model = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True)
    assert model.num_classes == 0
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["export"]["head"] = "keep"
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["export", str(run), "--out", str(tmp_path / "kept")]) == 0
    kept = timm.create_model(f"local-dir:{tmp_path / 'kept'}", pretrained=True)
    assert kept.num_classes == 1000 and kept.head.weight.shape == (1000, 384)
