"""Paths that exist but are the wrong kind of thing are said to be what they are, not "not found"."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from phreg.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def only_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_a_weights_folder_is_said_to_be_one_with_the_file_to_pass(tmp_path, capsys):
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"\0" * 16)
    (export / "config.json").write_text("{}")
    run = tmp_path / "run"
    assert main(["distill", str(QUICKSTART), f"model.checkpoint={export}", f"output_dir={run}"]) == 2
    line = only_line(capsys)
    assert f"model.checkpoint {export} is a folder, not a weights file; pass the weights file in it: " \
           f"{export / 'model.safetensors'}" in line and "not found" not in line
    assert "timm export folder" in line and f"local-dir:{export}" in line
    (export / "config.json").unlink()
    (export / "other.pth").write_bytes(b"\0")
    assert main(["distill", str(QUICKSTART), f"model.checkpoint={export}", f"output_dir={run}"]) == 2
    assert "pass one of the 2 weights files in it (model.safetensors, other.pth)" in only_line(capsys)
    assert not run.exists()


def test_an_image_given_as_data_root_is_said_to_be_a_file(tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(photo)
    assert main(["distill", str(QUICKSTART), f"data.root={photo}", f"output_dir={tmp_path / 'run'}"]) == 2
    line = only_line(capsys)
    assert f"data.root: {photo} is a file; data.root is a folder of images (or a Hugging Face dataset, or " \
           "WebDataset shards)" in line and "not found" not in line


@pytest.mark.parametrize("option", ["--images", "--teacher-checkpoint"])
def test_eval_says_the_same(tmp_path, capsys, option):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(photo)
    folder = tmp_path / "weights"
    folder.mkdir()
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text("{}")
    args = ["eval", "--student", str(student), "--teacher", "vit_small_patch14_dinov2", "--out", str(tmp_path / "o"),
            "--images", str(photo if option == "--images" else tmp_path)]
    if option == "--teacher-checkpoint":
        args += ["--teacher-checkpoint", str(folder)]
    assert main(args) == 2
    line = only_line(capsys)
    assert ("--images: " + f"{photo} is a file; --images is a folder of images" if option == "--images" else
            f"--teacher-checkpoint {folder} is a folder, not a weights file; pass a .safetensors") in line
