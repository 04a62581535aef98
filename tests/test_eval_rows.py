"""Which images each row of `phreg eval` is measured on: every row says how many of its images the student trained
on (`images`, `trained_images`), labels say it when some were, and only rows on never-trained images get a verdict
mark (bold in the model card, green/red in report.html)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import MODEL
from PIL import Image


def tiny_run_pair(tmp_path: Path):
    """A random 2-block DINOv2-S at 28 px and its 4-register student from a "run" that trained on 0.png and 1.png
    (its training list), and four images with label masks: eval in seconds."""
    import timm

    from phreg.backbones import add_registers
    from phreg.models.specs import Loaded
    from phreg.run.training_list import write_record

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, depth=2, img_size=28).eval()
    teacher = Loaded(model, "tiny-teacher", 28, (0.5,) * 3, (0.5,) * 3)
    images, masks, train, run = (tmp_path / n for n in ("images", "masks", "train", "run"))
    for folder in (images, masks, train, run):
        folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(images / f"{i}.png")
        Image.fromarray(rng.integers(0, 3, (40, 36)).astype(np.uint8), "L").save(masks / f"{i}.png")
    for name in ("0.png", "1.png"):
        shutil.copy(images / name, train / name)
    write_record(run, sorted(train.iterdir()), train)
    s = add_registers(model, 4)
    with torch.no_grad():  # registers that change the patch tokens: every distance differs from the teacher's
        s.reg_token.normal_(0, 3, generator=torch.Generator().manual_seed(1))
    student = Loaded(s, str(run), 28, (0.5,) * 3, (0.5,) * 3, run=run)
    return teacher, student, images, masks


def fake_probe(loaded, data, steps, device, progress="") -> dict:
    """One model's probe result without fitting one (seconds here): which rows it gives is what is tested."""
    return dict(miou=0.5, pixel_accuracy=0.8) if loaded.name == "tiny-teacher" else dict(miou=0.6, pixel_accuracy=0.7)


def test_rows_that_include_trained_images_say_how_many_and_only_held_out_rows_are_marked(tmp_path, monkeypatch):
    """Before, the row `same, val images only (2)` counted an image the student trained on without saying so, and the
    card put its better side in bold like the held-out headline's."""
    from phreg.eval import probe
    from phreg.eval.datasets import from_flags
    from phreg.eval.evaluate import EvalOptions, evaluate
    from phreg.eval.tables import number, winner
    from phreg.hub.card import eval_lead, eval_table

    monkeypatch.setattr(probe, "segmentation_scores", fake_probe)
    teacher, student, images, masks = tiny_run_pair(tmp_path)
    split = tmp_path / "split.txt"
    split.write_text("0.png train\n1.png val\n2.png val\n3.png train\n")  # val: 1.png (trained on) and 2.png
    r = evaluate(student, teacher, from_flags(images, masks, 3, None, split), tmp_path / "eval",
                 EvalOptions(views=2, pictures=0))
    rows = {row["metric"]: row for row in r["summary"]}

    assert all("images" in row and "trained_images" in row for row in r["summary"])
    head, everything, val = rows["denoised_distance"], rows["denoised_distance_all"], rows["denoised_distance_val"]
    assert (head["images"], head["trained_images"]) == (2, 0)  # 2.png and 3.png
    assert (everything["images"], everything["trained_images"]) == (4, 2)
    assert (val["images"], val["trained_images"]) == (2, 1)
    assert val["label"] == "  same, val images only (2, 1 of them trained on)"
    assert (rows["miou"]["trained_images"], rows["pixel_accuracy"]["trained_images"]) == (1, 1)
    assert rows["pixel_accuracy"]["label"].endswith("[2 images, 1 trained on]")
    for key in ("tta_noise", "max_norm_ratio", "patch_norm_variance", "outliers_two_tailed", "cls_cosine"):
        assert rows[key]["trained_images"] == 2 and rows[key]["label"].endswith("[4 images, 2 trained on]"), key
    assert (rows["gflops"]["images"], rows["gflops"]["trained_images"]) == (None, 0)  # the model, not the images
    # the per-token tail is scored on the headline's images (the two never trained on)
    assert rows["denoised_distance_p50"]["trained_images"] == 0 and r["denoised_distance_tokens"]["images"] == 2
    assert all("trained on" in row["label"] for row in r["summary"] if row["trained_images"])

    card = {line[2:].split(" | ")[0]: line for line in eval_table(r).splitlines()[2:]}
    html = (tmp_path / "eval" / "report.html").read_text()
    assert winner(dict(val, trained_images=0)) is not None  # the row has a better side ...
    assert "**" not in card[val["label"]]  # ... which is not marked: one of its two images was trained on
    assert f"<td>{number(val['teacher'])}</td><td class=''>" in html.split("val images only")[1][:200]
    for row in r["summary"]:
        marked = "**" in card[row["label"]]
        assert marked == (row["trained_images"] == 0 and winner(row) is not None), row["label"]
    assert "**" in card[head["label"]] and "**" in card[rows["gflops"]["label"]]
    assert "only on rows measured on images the student never trained on" in eval_lead(r)


def test_without_a_training_list_no_row_is_marked(tmp_path):
    """A student whose training images are not known (an export from elsewhere): every row is shown as measured."""
    from phreg.eval.evaluate import EvalOptions, evaluate
    from phreg.hub.card import eval_table
    from phreg.models.specs import Loaded

    teacher, s, images, _ = tiny_run_pair(tmp_path)
    student = Loaded(s.model, "an-export", 28, s.mean, s.std)
    r = evaluate(student, teacher, images, tmp_path / "eval", EvalOptions(views=2, pictures=0))
    assert all(row["trained_images"] is None for row in r["summary"] if row["images"] is not None)
    assert [line for line in eval_table(r).splitlines() if "**" in line] == \
        [line for line in eval_table(r).splitlines() if line.startswith("| forward GFLOPs")]


def test_the_worst_block_of_a_side_without_outliers_says_so(monkeypatch):
    """`(blocks 0 / 0)` named block 0 as the worst of a teacher that has no outlier at any block."""
    from phreg.eval import metrics

    flat = torch.full((3, 2, 16), 10.0)  # (blocks, images, patches): every token at its image's median
    spiky = flat.clone()
    spiky[1, 0, 5] = 100.0  # one token above 2x the median, at block 1
    norms = {"teacher-model": flat, "student-model": spiky}
    monkeypatch.setattr(metrics, "block_patch_norms", lambda model, images: norms[model])
    ctx = SimpleNamespace(a_t=SimpleNamespace(tta=SimpleNamespace(images=None)),
                          teacher=SimpleNamespace(model="teacher-model"),
                          student=SimpleNamespace(model="student-model"),
                          images=lambda indices=None: metrics.Images(2, 0))
    rows = {row["metric"]: row for row in metrics.norm_tails(ctx).rows}
    assert rows["outliers_worst_block"]["label"] == "  same, at the block with the most (no outliers / block 1)"
    assert rows["outliers_worst_block"]["student"] == pytest.approx(1 / 32)
    norms["teacher-model"] = spiky
    rows = {row["metric"]: row for row in metrics.norm_tails(ctx).rows}
    assert rows["outliers_worst_block"]["label"].endswith("(block 1 / block 1)")
