"""inspect and eval on real weights: the artifact fixture, a distillation from it, the reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from phreg.config.recipe import ModelCfg, load_recipe
from phreg.distill.loop import distill
from phreg.eval.implant import calibration_images, implant_artifacts
from phreg.eval.inspection import inspect_model
from phreg.models.loading import load_teacher, normalization
from phreg.models.specs import load_spec

from conftest import MODEL

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="session")
def artifact_checkpoint(tmp_path_factory, dinov2_file) -> Path:
    """DINOv2-S/14 at 224 px with implanted high-norm artifacts (phreg.eval.implant), built once per session."""
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
    assert saved["figures"] == [Path(f).stem + ".png" for f in saved["files"][:2]] + ["norm_histogram.png"]
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
    from phreg.models.specs import Loaded

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

        metrics.METRICS.append(patch_count.metric)
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


def tiny_pair(tmp_path: Path, n_images: int = 3):
    """A random 2-block DINOv2-S at 28 px and its 4-register student, and a folder of random images: eval in seconds."""
    import numpy as np
    import timm
    from PIL import Image

    from phreg.backbones import add_registers
    from phreg.models.specs import Loaded

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, depth=2, img_size=28).eval()
    teacher = Loaded(model, "tiny-teacher", 28, (0.5,) * 3, (0.5,) * 3)
    student = Loaded(add_registers(model, 4), "tiny-student", 28, (0.5,) * 3, (0.5,) * 3)
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(images / f"{i}.png")
    return teacher, student, images


def test_small_things_a_reader_notices(tmp_path, monkeypatch):
    """The CLS-cosine row has no verdict (the teacher's 1 is trivial: no red cell); a model with registers is not told
    that distillation can still denoise it; patch-norm maps share one robust colour range (1st-99th percentile of
    teacher and student together, not 0 to the maximum)."""
    import numpy as np

    from phreg.eval import evaluate as ev
    from phreg.eval.evaluate import EvalOptions, evaluate
    from phreg.hub.card import eval_table

    teacher, student, images = tiny_pair(tmp_path)
    seen = []
    real = ev.panels
    monkeypatch.setattr(ev, "panels", lambda image, rows, path, norms=None, **kw: seen.append((rows, norms)) or
                        real(image, rows, path, norms, **kw))
    r = evaluate(student, teacher, images, tmp_path / "eval", EvalOptions(views=2, pictures=2))
    cls = next(row for row in r["summary"] if row["metric"] == "cls_cosine")
    assert cls["teacher"] == 1.0 and cls["better"] is None and "by definition" in cls["note"]
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "<td>CLS token cosine to the teacher&#x27;s</td><td>1</td><td class=''>" in html
    from phreg.eval.tables import number

    assert (f"| CLS token cosine to the teacher's | 1 | {number(cls['student'])} | 1 is the teacher's by definition; "
            "no verdict |") in eval_table(r)  # not bold: no winner
    assert "can still denoise" not in r["student"]["verdict"] and "4 register tokens" in r["student"]["verdict"]
    assert "can still denoise" in r["teacher"]["verdict"] or r["teacher"]["verdict"].startswith("HIGH-NORM")

    assert len(seen) == 2 and seen[0][1] == seen[1][1]  # every picture: one range
    norms = np.concatenate([np.asarray(m["norm"]).ravel() for rows, _ in seen for _, m in rows])
    lo, hi = seen[0][1]  # before: (max,) read as 0..max
    assert 0 < norms.min() <= lo and hi <= norms.max()
    assert (norms < lo).mean() <= 0.02 and (norms > hi).mean() <= 0.02
    # a few artifact tokens no longer set the scale: norms of 40-60 span it, a 500 is clipped
    from phreg.eval.figures import norm_range

    flat = {"norm": torch.linspace(40, 60, 400)}
    spiky = {"norm": torch.cat([torch.linspace(40, 60, 396), torch.full((4,), 500.0)])}
    lo, hi = norm_range([flat, spiky])
    assert 40 <= lo < 41 and 59 < hi <= 60


def test_the_headline_is_scored_on_images_the_student_never_trained_on(tmp_path):
    """eval finds by itself which of its images are in the run's training list (by content, and by name beside it)
    and computes the headline row on the others; the row, report and card say so. Before, the headline mixed
    training and held-out images and nothing flagged it."""
    import html
    import shutil

    from phreg.eval.evaluate import EvalOptions, evaluate
    from phreg.hub.card import eval_lead, eval_table
    from phreg.models.specs import Loaded
    from phreg.run.training_list import RECORD, write_record

    teacher, s, images = tiny_pair(tmp_path, n_images=4)
    run = tmp_path / "run"
    train = tmp_path / "train"
    train.mkdir()
    run.mkdir()
    for name in ("0.png", "1.png"):
        shutil.copy(images / name, train / name)
    shutil.copy(images / "2.png", train / "renamed.png")  # image 2: trained on under another name
    shutil.copy(images / "0.png", images / "0_copy.png")  # a copy of a training image in the eval set
    (images / "3.png").rename(images / "x.png")
    shutil.copy(images / "x.png", train / "3.png")  # trained under the name 3.png
    (images / "3.png").write_bytes((images / "1.png").read_bytes()[:-1] + b"\0")  # name of one, content of none
    write_record(run, sorted(train.iterdir()), train)
    assert len((run / RECORD).read_text().splitlines()) == 1 + 4
    student = Loaded(s.model, str(run), 28, s.mean, s.std, run=run)

    r = evaluate(student, teacher, images, tmp_path / "eval", EvalOptions(views=2, pictures=0))
    files = [Path(f).name for f in r["files"]]
    assert files == ["0.png", "0_copy.png", "1.png", "2.png", "3.png", "x.png"]
    o = r["training_overlap"]
    assert o["recorded"] and [files[i] for i in o["trained"]] == ["0.png", "0_copy.png", "1.png", "2.png", "x.png"]
    assert o["unseen"] == [4] and o["by_name"] == 3 and o["same_name_other_content"] == 1  # 0, 1, 3 .png
    head, everything = r["summary"][:2]
    d = r["denoised_distance"]
    assert head["label"] == "mean 1 - cos to TTA-denoised teacher features (1 never-trained image)"
    assert head["student"] == d["per_image_student"][4] and head["teacher"] == d["per_image_teacher"][4]
    assert everything["label"] == "  same, all 6 images (5 of them trained on)"
    assert everything["student"] == pytest.approx(sum(d["per_image_student"]) / 6)
    report = html.unescape((tmp_path / "eval" / "report.html").read_text())
    lead = eval_lead(r)
    for text in (report, lead):  # the counts reach every reader, whatever the sentence around them
        assert "5 of the 6 images" in text and "training list" in text, text
    assert "scored on the 1 never trained on" in lead
    assert "(1 never-trained image)" in eval_table(r)

    (images / "3.png").unlink()
    (images / "x.png").unlink()  # every image left was trained on: the row says it is not a held-out score
    r = evaluate(student, teacher, images, tmp_path / "eval2", EvalOptions(views=2, pictures=0))
    assert r["summary"][0]["label"].endswith("(all 4 images were trained on: not a held-out score)")
    r = evaluate(Loaded(s.model, "x", 28, s.mean, s.std), teacher, images, tmp_path / "eval3",
                 EvalOptions(views=2, pictures=0))
    assert r["summary"][0]["label"].endswith("(4 images; training overlap unknown)")
