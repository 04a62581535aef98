"""Shared fixtures. Real DINOv2-S weights and real photos come from ../shared/assets (CI always has it)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# Tests never download: timm / huggingface_hub must fail fast instead of trying the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("PHREG_ASSETS", REPO.parent / "shared" / "assets"))
DINOV2_S = ASSETS / "weights" / "dinov2_vits14.safetensors"
CAMVID = ASSETS / "images" / "camvid_subset"
MODEL = "vit_small_patch14_dinov2"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Tests share one process: after each, Accelerate's process-wide state is reset as a new process would have it
    (an Accelerator made with other settings than an earlier test's refuses to start otherwise)."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: real weights/images live in ../shared/assets (set PHREG_ASSETS to move it)")
    return path


@pytest.fixture(scope="session")
def dinov2_file() -> Path:
    return need(DINOV2_S)


@pytest.fixture
def checkpoints(tmp_path, monkeypatch, dinov2_file) -> Path:
    """A checkpoints folder holding DINOv2-S under its timm name, as `.ci/run` sets up the repo's own."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / f"{MODEL}.safetensors").symlink_to(dinov2_file)
    monkeypatch.setenv("PHREG_CHECKPOINTS", str(folder))
    return folder


@pytest.fixture(scope="session")
def camvid(tmp_path_factory) -> dict[str, Path]:
    """CamVid subset as train/ and val/ folders of links, split as in its manifest (52 / 15 frames)."""
    need(CAMVID)
    root = tmp_path_factory.mktemp("camvid")
    with open(CAMVID / "manifest.csv") as f:
        for row in csv.DictReader(f):
            (root / row["split"]).mkdir(exist_ok=True)
            (root / row["split"] / row["file"]).symlink_to(CAMVID / "images" / row["file"])
    return {"train": root / "train", "val": root / "val", "masks": CAMVID / "masks", "root": CAMVID}


@pytest.fixture(scope="session")
def teacher224(dinov2_file):
    from phreg.config.recipe import ModelCfg
    from phreg.models.loading import load_teacher

    return load_teacher(ModelCfg(name=MODEL, checkpoint=str(dinov2_file), img_size=224))


@pytest.fixture(scope="session")
def photos(camvid) -> torch.Tensor:
    """Four real CamVid frames, 224 px center crops in ImageNet normalization: (4, 3, 224, 224)."""
    from phreg.data.images import ImageDataset
    from phreg.data.scan import scan_images

    files, _ = scan_images(camvid["val"])
    data = ImageDataset(files[:4], 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), train=False)
    return data.images()


# A 1-step run at a tiny size (distill arguments), and random weights for families with no weights here.
def tiny(folder: Path, name: str, weights: Path | None, size: int, *extra: str) -> list[str]:
    return [f"output_dir={folder}", f"model.name={name}", f"model.img_size={size}", "views.num=2",
            "data.num_workers=0", "train.batch_size=2", "train.max_steps=1", "data.val_split=0.25",
            *([f"model.checkpoint={weights}"] if weights else []), *extra]


def random_weights(name: str, path: Path) -> Path:
    import safetensors.torch  # here, not at collection: huggingface_hub reads HF_HUB_OFFLINE when timm imports it
    import timm

    safetensors.torch.save_file(timm.create_model(name, pretrained=False).state_dict(), str(path))
    return path


# ---------------------------------------------------------------------------------- the command line, as users run it

def phreg(*args, env: dict | None = None, drop=(), cwd=None, launch: str | None = None, wait: bool = True,
          timeout: float = 300):
    """`phreg ARGS` in a subprocess, offline (HF_HUB_OFFLINE=1), as a user runs it; the result carries the wall time
    as `.seconds`. `drop`: environment variables to unset. `launch`: Python source run instead of `python -m phreg`
    (it reads sys.argv), for a test that installs hooks first. `wait=False`: the running `Popen`."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    for key in drop:
        full.pop(key, None)
    cmd = [sys.executable, *(["-c", launch] if launch else ["-m", "phreg"]), *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full, cwd=cwd)
    began = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=full, cwd=cwd, timeout=timeout)
    out.seconds = time.perf_counter() - began
    return out


def one_line(result: subprocess.CompletedProcess, code: int, *messages: str, untouched: Path | None = None) -> str:
    """A mistake or fault as users must see it: exit `code`, one line on stderr holding every message, no traceback;
    `untouched`: a run folder that must hold no export and no checkpoint afterwards. Returns the line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for m in messages:
        assert m in lines[0], lines[0]
    if untouched is not None:
        assert not (untouched / "export").exists() and not (untouched / "checkpoints").exists()
    return lines[0]


def last_line(stderr: str) -> str:
    """The last `phreg:` line of a run that printed progress before it (a stop, a resume hint), with no traceback."""
    assert "Traceback" not in stderr, stderr
    return [ln for ln in stderr.strip().splitlines() if ln.startswith("phreg:")][-1]


def fake_run(run: Path, checkpoints=(), export_step: int | None = None, summary_step: int | None = None,
             recipe: str = "seed: 0\n") -> Path:
    """A run folder as distill leaves it, without training: recipe.yaml; a checkpoint folder per step in
    `checkpoints`; with `export_step` an export whose weights' header says that step (and a config.json); with
    `summary_step` a summary.json."""
    from safetensors.numpy import save_file
    import numpy as np

    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.yaml").write_text(recipe)
    for step in checkpoints:
        (run / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    if export_step is not None:
        (run / "export").mkdir()
        save_file({"w": np.zeros(2, np.float32)}, str(run / "export" / "model.safetensors"),
                  metadata=dict(steps=str(export_step)))
        (run / "export" / "config.json").write_text("{}\n")
    if summary_step is not None:
        (run / "summary.json").write_text(json.dumps(dict(steps=summary_step)))
    return run
