"""inspect and eval on real weights: the artifact fixture, a distillation from it, the reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from phreg.eval.fixture import calibration_images, implant_artifacts
from phreg.eval.inspection import inspect_model
from phreg.models import load_spec, load_teacher, normalization
from phreg.recipe import ModelCfg, load_recipe
from phreg.distill.loop import distill

from conftest import MODEL

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="session")
def artifact_checkpoint(tmp_path_factory, dinov2_file) -> Path:
    """DINOv2-S/14 at 224 px with implanted high-norm artifacts (phreg.eval.fixture), built once per session."""
    cfg = ModelCfg(name=MODEL, checkpoint=str(dinov2_file), img_size=224)
    model = load_teacher(cfg)
    info = implant_artifacts(model, calibration_images(224, *normalization(model, cfg)))
    assert info["marker_separation_sigma"] > 8 and info["flatness_fit_corr"] > 0.9  # the implant is well made
    assert info["calibration_fires_off_marker"] == 0
    path = tmp_path_factory.mktemp("fixture") / "artifacts.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
def test_inspect_finds_the_implanted_artifacts_and_none_in_the_clean_model(camvid, dinov2_file,
                                                                          artifact_checkpoint, tmp_path):
    clean = inspect_model(load_spec(MODEL, 224, str(dinov2_file)), camvid["val"], None, views=4, limit=8)
    assert not clean["outliers"]["rule"]["bimodal"] and clean["outliers"]["fraction"] == 0
    assert clean["outliers"]["max_over_median"] < 2 and clean["verdict"].startswith("no high-norm artifacts")

    out = tmp_path / "inspect"
    art = inspect_model(load_spec(MODEL, 224, str(artifact_checkpoint)), camvid["val"], out, views=4, limit=8,
                        pictures=2)
    o = art["outliers"]
    assert o["rule"]["bimodal"] and 0.005 < o["fraction"] < 0.1 and art["verdict"].startswith("HIGH-NORM")
    assert o["max_over_median"] > 3
    assert o["neighbour_cos_outliers"] < o["neighbour_cos_others"] - 0.3  # artifacts do not look like neighbours
    assert art["tta_noise"]["mean_1_minus_cos"] > 1.5 * clean["tta_noise"]["mean_1_minus_cos"]  # position-tied
    freq = torch.tensor(o["position_frequency"])
    assert (freq > 0).float().mean() < 0.15  # a sparse set of grid cells
    saved = json.loads((out / "inspect.json").read_text())
    assert saved["schema"] == "phreg.inspect/1" and saved["outliers"]["fraction"] == o["fraction"]
    assert saved["figures"] == ["image_00.png", "image_01.png", "norm_histogram.png"]
    assert all((out / f).read_bytes()[:4] == b"\x89PNG" for f in saved["figures"])


@pytest.mark.slow
def test_distilling_the_artifact_model_removes_its_outliers_on_unseen_images(camvid, artifact_checkpoint,
                                                                             tmp_path):
    recipe = load_recipe(RECIPES / "dinov2_vits14.yaml", [
        f"output_dir={tmp_path / 'run'}", f"model.checkpoint={artifact_checkpoint}", f"data.root={camvid['train']}",
        "train.epochs=4", "cache.plans=1"])  # 10 views: fewer leave the artifact teacher's targets too noisy
    run = distill(recipe, quiet=True)
    result = subprocess.run([sys.executable, "-m", "phreg", "eval", "--student", str(run), "--images",
                             str(camvid["val"]), "--figures", "2", "--masks", str(camvid["masks"]),
                             "--num-classes", "11", "--ignore-index", "11"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    r = json.loads((run / "eval" / "eval.json").read_text())  # default --out: RUN/eval; teacher: the run's
    rows = {row["metric"]: row for row in r["summary"]}
    print({k: (v["teacher"], v["student"]) for k, v in rows.items()})
    assert rows["outlier_fraction"]["teacher"] > 0.005
    assert rows["outlier_fraction"]["student"] < 0.25 * rows["outlier_fraction"]["teacher"]
    assert rows["denoised_distance"]["student"] < rows["denoised_distance"]["teacher"]
    assert rows["gflops"]["student"] > rows["gflops"]["teacher"]  # 16 more tokens cost a few percent
    assert rows["gflops"]["student"] < 1.15 * rows["gflops"]["teacher"]
    assert r["teacher"]["name"] == MODEL and r["images"] == 15
    probe = r["probe"]  # default split: every 4th image is val
    assert (probe["train_images"], probe["val_images"]) == (12, 3) and 0.2 < rows["miou"]["teacher"] < 1
    assert 0.5 < rows["pixel_accuracy"]["student"] <= 1
    html = (run / "eval" / "report.html").read_text()
    assert "<table>" in html and html.count("data:image/png;base64,") == len(r["figures"]) == 3
    assert "mean 1 - cos to TTA-denoised teacher features" in html and "src='compare_0.png'" not in html


def test_eval_usage_errors(tmp_path, camvid, dinov2_file):
    def phreg(*args):
        return subprocess.run([sys.executable, "-m", "phreg", "eval", *map(str, args)], capture_output=True, text=True)

    for args, message in [
        (["--student", MODEL, "--images", camvid["val"], "--out", tmp_path], "--teacher is required"),
        (["--student", tmp_path / "nope", "--images", camvid["val"]], "no such folder"),
        (["--student", tmp_path, "--images", camvid["val"]], "neither a phreg run nor a timm export"),
    ]:
        r = phreg(*args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_metric_is_one_function_and_its_rows_reach_every_reader(tmp_path):
    """The summary lists the registered metrics' rows in registration order; a metric added with `@metric` (one
    function) lands in eval.json under its key, in the summary, report.html and the card, with nothing else edited."""
    import numpy as np
    import timm
    from PIL import Image

    from phreg.backbones import add_registers
    from phreg.eval import metrics
    from phreg.eval.evaluate import EvalOptions, evaluate
    from phreg.hub.card import eval_table
    from phreg.models import Loaded

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, depth=2, img_size=28).eval()
    teacher = Loaded(model, "tiny-teacher", 28, (0.5,) * 3, (0.5,) * 3)
    student = Loaded(add_registers(model, 4), "tiny-student", 28, (0.5,) * 3, (0.5,) * 3)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(images / f"{i}.png")

    registered = list(metrics.METRICS)
    try:
        @metrics.metric("patch_count")
        def patch_count(ctx):
            n = [len(a.patch_norms[0]) for a in (ctx.a_t, ctx.a_s)]
            return metrics.Measured(dict(teacher=n[0], student=n[1]),
                                    [metrics.row("patch_count", "patch tokens per image", *n, None)])

        r = evaluate(student, teacher, images, tmp_path / "eval", EvalOptions(views=2, pictures=1))
    finally:
        metrics.METRICS[:] = registered
    assert [row["metric"] for row in r["summary"]] == [
        "denoised_distance", "denoised_distance_p50", "denoised_distance_p90", "denoised_distance_p99", "tta_noise",
        "outlier_fraction", "max_norm_ratio", "outliers_two_tailed", "outliers_low_tail", "outliers_worst_block",
        "register_attention_cls", "register_attention_patches", "patch_norm_variance", "cls_cosine", "gflops",
        "images_per_s", "patch_count"]
    assert r["patch_count"] == dict(teacher=4, student=4) and r["summary"][-1]["teacher"] == 4
    assert [k for k in r if k in ("denoised_distance", "high_norm_mass", "cls_cosine", "cost", "patch_count")] == \
        ["denoised_distance", "high_norm_mass", "cls_cosine", "cost", "patch_count"]  # eval.json: measured order
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["summary"] == r["summary"] and saved["patch_count"] == r["patch_count"]
    assert "<td>patch tokens per image</td><td>4</td><td class=''>4</td>" in \
        (tmp_path / "eval" / "report.html").read_text()
    assert "| patch tokens per image | 4 | 4 |  |" in eval_table(r)
