"""`phreg eval` with the probes: depth and segmentation together on hand-wired folders, their rows in eval.json, the
terminal table, report.html and the model card, the extra (test-time register) columns without training the
teacher's probes twice, and a benchmark layout measured on its own split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MODEL


def tiny_pair(size: int = 56):
    import timm

    from phreg.backbones import add_registers
    from phreg.models.specs import Loaded

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, depth=2, img_size=size).eval()
    return (Loaded(model, "tiny-teacher", size, (0.5,) * 3, (0.5,) * 3),
            Loaded(add_registers(model, 4), "tiny-student", size, (0.5,) * 3, (0.5,) * 3))


def two_colour_set(root, n: int = 8):
    """Images half red (class 0, 2 m away) and half blue (class 1, 6 m), the split at a random column; a split file
    with the last two as val."""
    rng = np.random.default_rng(0)
    for folder in ("images", "masks", "depth"):
        (root / folder).mkdir(parents=True)
    for i in range(n):
        cut = int(rng.integers(20, 50))
        img = np.zeros((56, 70, 3), np.uint8)
        img[:, :cut, 0], img[:, cut:, 2] = 220, 220
        labels = (np.arange(70)[None, :].repeat(56, 0) >= cut).astype(np.uint8)
        depth = np.where(labels == 0, 2000, 6000).astype(np.uint16)
        depth[:4] = 0  # unmeasured rows
        Image.fromarray(img).save(root / "images" / f"f{i}.png")
        Image.fromarray(labels, "L").save(root / "masks" / f"f{i}.png")
        Image.fromarray(depth).save(root / "depth" / f"f{i}.png")
    (root / "split.csv").write_text("file,split\n" + "".join(f"f{i}.png,{'val' if i >= n - 2 else 'train'}\n"
                                                           for i in range(n)))


@pytest.mark.slow
def test_depth_and_segmentation_rows_reach_every_reader_and_the_teacher_is_probed_once(tmp_path, monkeypatch):
    import copy

    from phreg.eval import depth as depth_module
    from phreg.eval.datasets import from_flags
    from phreg.eval.evaluate import EvalOptions, evaluate
    from phreg.eval.tables import text_table
    from phreg.hub.card import eval_lead, eval_table
    from phreg.models.specs import Loaded

    teacher, student = tiny_pair()
    again = Loaded(copy.deepcopy(student.model), "tiny-again", 56, student.mean, student.std)
    two_colour_set(tmp_path)
    data = from_flags(tmp_path / "images", tmp_path / "masks", 2, None, tmp_path / "split.csv", tmp_path / "depth")
    calls = []
    real = depth_module.depth_scores
    monkeypatch.setattr(depth_module, "depth_scores", lambda m, *a, **k: calls.append(m.name) or real(m, *a, **k))
    r = evaluate(student, teacher, data, tmp_path / "eval", EvalOptions(views=2, pictures=1, probe_steps=40),
                 others=dict(again=again), columns=dict(teacher="teacher", student="student", again="again"))
    assert calls == ["tiny-teacher", "tiny-student", "tiny-again"]  # the teacher's probe is reused by the column

    d = r["depth"]
    assert (d["train_images"], d["val_images"], d["split"], d["steps"]) == (6, 2, "val", 40)
    assert set(d["teacher"]) >= {"delta1", "delta2", "delta3", "abs_rel", "rmse", "log10"}
    assert d["teacher"]["images_scored"] == 2 and d["figures"] == ["depth_f6.png"]  # after the first val image
    rows = {row["metric"]: row for row in r["summary"]}
    assert rows["depth_rmse"]["label"] == "depth-probe RMSE, m (2 val images)" and rows["depth_rmse"]["better"] == "lower"
    assert rows["depth_rmse"]["teacher"] == d["teacher"]["rmse"] and rows["depth_delta1"]["better"] == "higher"
    assert rows["depth_rmse"]["others"]["again"] == pytest.approx(d["student"]["rmse"])  # same weights, same probe
    assert r["probe"]["train_images"] == 6 and 0 <= rows["miou"]["student"] <= 1
    assert r["dataset"]["depth"] == str(tmp_path / "depth") and r["dataset"]["probe_val"] == 2

    assert "depth-probe RMSE, m (2 val images)" in text_table(r)
    card = eval_table(r)
    assert "| depth-probe RMSE, m (2 val images) |" in card and "| depth-probe δ < 1.25 (share of pixels) |" in card
    assert "depth probe" in eval_lead(r)
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "<h2>Depth probe</h2>" in html and "RMSE (m)" in html and "<td>again</td>" in html
    assert html.count("data:image/png;base64,") == len(r["figures"]) + 1  # + the depth picture


@pytest.mark.slow
def test_a_benchmark_layout_measures_artifacts_and_scores_the_probe_on_its_val_split(tmp_path):
    from test_datasets import voc

    from phreg.eval.datasets import open_dataset
    from phreg.eval.evaluate import EvalOptions, evaluate
    from phreg.hub.card import eval_lead

    teacher, student = tiny_pair()
    data = open_dataset(f"voc:{voc(tmp_path / 'voc')}")
    r = evaluate(student, teacher, data, tmp_path / "eval", EvalOptions(views=2, pictures=0, probe_steps=10))
    assert r["images"] == 1 and r["files"] == [str(data.files[2])]  # the artifact metrics: the val image
    p = r["probe"]
    assert (p["train_images"], p["val_images"], p["num_classes"], p["ignore_index"]) == (2, 1, 21, 255)
    assert len(p["teacher"]["per_class_iou"]) == 21 and p["teacher"]["per_class_iou"][7] is None  # no cat anywhere
    assert r["dataset"]["kind"] == "voc" and r["dataset"]["val_name"] == "val"
    assert "denoised_distance_val" not in {row["metric"] for row in r["summary"]}  # every analysed image is val
    assert eval_lead(r).startswith("Teacher vs student on the 1 val images of PASCAL VOC 2012 (21 classes) (`phreg "
                                   "eval --dataset voc`); probes trained on its 2 train images (the official")


def fake_depth(loaded, data, steps, device, progress="", keep=0):
    """One model's depth-probe result without fitting one: which rows it gives and how they are marked is tested."""
    errors = dict(delta1=0.6, delta2=0.8, delta3=0.9, abs_rel=0.3, rmse=1.5, log10=0.1)
    if loaded.name != "tiny-teacher":  # the student: better on every metric
        errors = dict(errors, delta1=0.7, abs_rel=0.2, rmse=1.0)
    return dict(errors, images_scored=len(data.val)), []


@pytest.mark.parametrize("split, trained", [("0.png train\n1.png val\n2.png val\n3.png train\n", 1),
                                            ("0.png train\n1.png train\n2.png val\n3.png val\n", 0)])
def test_depth_rows_say_how_many_of_their_val_images_were_trained_on_and_only_held_out_ones_are_marked(
        tmp_path, monkeypatch, split, trained):
    from test_eval_rows import tiny_run_pair

    from phreg.eval import depth as depth_module
    from phreg.eval.datasets import from_flags
    from phreg.eval.evaluate import EvalOptions, evaluate
    from phreg.hub.card import eval_table

    monkeypatch.setattr(depth_module, "depth_scores", fake_depth)
    teacher, student, images, _ = tiny_run_pair(tmp_path)  # the student's run trained on 0.png and 1.png
    (tmp_path / "depth").mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 36), 3000, np.uint16)).save(tmp_path / "depth" / f"{i}.png")
    (tmp_path / "split.txt").write_text(split)
    data = from_flags(images, depth=tmp_path / "depth", split=tmp_path / "split.txt")
    r = evaluate(student, teacher, data, tmp_path / "eval", EvalOptions(views=2, pictures=0))
    rows = [row for row in r["summary"] if row["metric"].startswith("depth_")]
    assert [row["metric"] for row in rows] == ["depth_rmse", "depth_abs_rel", "depth_delta1"]
    assert all((row["images"], row["trained_images"]) == (2, trained) for row in rows)
    card = {line[2:].split(" | ")[0].replace("\\|", "|"): line for line in eval_table(r).splitlines()[2:]}
    if trained:
        assert rows[0]["label"] == "depth-probe RMSE, m (2 val images, 1 of them trained on by the student)"
        assert all(row["label"].endswith("[2 images, 1 trained on]") for row in rows[1:])
        assert not any("**" in card[row["label"]] for row in rows)  # better, but partly on its training images
    else:
        assert rows[0]["label"] == "depth-probe RMSE, m (2 val images)"
        assert all("**" in card[row["label"]] for row in rows)
