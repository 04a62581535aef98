"""Test-time registers everywhere a model is used (eval columns, inspect --neurons, --ttr, dense_features,
model.teacher_ttr) and the artifact measures that hold for every family (phreg/eval/metrics.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from phreg import dense_features
from phreg.backbones import add_registers
from phreg.cli import main
from phreg.eval import metrics
from phreg.models.specs import Loaded
from phreg.ttr.model import add_test_time_registers
from phreg.ttr.use import with_test_time_registers

from conftest import MODEL

TINY = dict(depth=2, img_size=28)


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(MODEL, pretrained=False, **TINY).eval()


def test_tails_per_block_by_hand():
    norms = torch.full((3, 2, 10), 10.0)  # 3 blocks, 2 images, 10 patches each
    norms[1, 0, :2] = 30.0  # block 1: two high-norm tokens in image 0
    norms[2, 1, 3] = 4.0  # block 2: one low-norm token in image 1 (below 1/2 of the median)
    rows = metrics.tail_fractions(norms)
    assert [r["block"] for r in rows] == [0, 1, 2]
    assert rows[0]["both"] == 0 and rows[1]["high"] == pytest.approx(2 / 20) and rows[1]["low"] == 0
    assert rows[2]["low"] == pytest.approx(1 / 20) and rows[2]["high"] == 0
    one_tailed = norms[2].max() / norms[2].median()  # what the last-block high-tail rule sees: nothing
    assert one_tailed == 1


def test_norm_variance_is_scale_free():
    n = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    v, v10 = metrics.norm_variance(n), metrics.norm_variance(10 * n)
    assert v["variance"] == pytest.approx(n.var().item()) and v10["relative"] == pytest.approx(v["relative"])


def test_register_attention_share(tiny):
    x = torch.randn(3, 3, 28, 28)
    none = metrics.register_attention_share(tiny, x)
    assert none == dict(cls=0.0, patches=0.0, registers=0)
    student = add_registers(tiny, 4)
    got = metrics.register_attention_share(student, x)
    # by hand: the last block's softmax weights, summed over the 4 register columns, mean over heads
    seen = []
    attn = student.blocks[-1].attn
    attn.fused_attn = False
    h = attn.attn_drop.register_forward_hook(lambda m, a, w: seen.append(w))
    with torch.no_grad():
        student.forward_features(x)
    h.remove()
    w = seen[0][..., 1:5].sum(-1).mean(1)  # (B, N)
    assert got["registers"] == 4 and got["cls"] == pytest.approx(w[:, 0].mean().item(), rel=1e-5)
    assert got["patches"] == pytest.approx(w[:, 5:].mean().item(), rel=1e-5) and 0 < got["patches"] < 1


def test_token_distances_average_to_the_per_image_distance(tiny):
    from phreg.config.recipe import ViewsCfg
    from phreg.targets.heldout import HeldOut
    from phreg.targets.teacher import DenoisedTeacher

    x = torch.randn(3, 3, 28, 28)
    held = HeldOut.from_images(x, DenoisedTeacher(tiny, ViewsCfg(num=3), (0.5,) * 3, (0.5,) * 3), 0, "cpu")
    per_token = metrics.token_distances(held, tiny)
    assert per_token.shape == (3, 4) and torch.allclose(per_token.mean(1), held.teacher_distances, atol=1e-5)


def images_folder(tmp_path: Path, n: int = 3) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.slow
def test_eval_compares_four_models_in_one_table(tiny, tmp_path):
    """teacher / test-time registers / student / both: a column each in eval.json, report.html and the card; the
    phreg.eval/1 readers (card, push) keep reading teacher and student."""
    from phreg.eval.evaluate import EvalOptions, evaluate
    from phreg.hub.card import eval_table
    from phreg.hub.publish import read_eval

    teacher = Loaded(tiny, "tiny-teacher", 28, (0.5,) * 3, (0.5,) * 3)
    student = Loaded(add_registers(tiny, 4), "tiny-student", 28, (0.5,) * 3, (0.5,) * 3)
    ttr, _ = with_test_time_registers(teacher, "given", neurons={0: [1, 2]})
    both, _ = with_test_time_registers(student, "given", neurons={0: [1, 2]})
    labels = dict(teacher="teacher", ttr="test-time registers", student="PH-Reg student", both="both")
    r = evaluate(student, teacher, images_folder(tmp_path), tmp_path / "eval", EvalOptions(views=2, pictures=1),
                 dict(ttr=ttr, both=both), labels, dict(source="given", neurons={"0": [1, 2]}, count=2, found=None))
    assert [c["key"] for c in r["columns"]] == ["teacher", "ttr", "student", "both"]
    assert [c["name"] for c in r["columns"]] == ["tiny-teacher", "tiny-teacher +TTR", "tiny-student",
                                                 "tiny-student +TTR"]
    for row in r["summary"]:
        assert set(row["others"]) == {"ttr", "both"} and "teacher" in row and "student" in row
    rows = {row["metric"]: row for row in r["summary"]}
    att = rows["register_attention_patches"]  # the teacher has no registers; each other model has some
    assert att["teacher"] == 0 and all(0 < v < 1 for v in (att["student"], *att["others"].values()))
    assert rows["gflops"]["others"]["both"] > rows["gflops"]["student"] > rows["gflops"]["teacher"]
    assert r["others"]["ttr"]["register_attention"]["student"]["registers"] == 1
    assert r["others"]["both"]["register_attention"]["student"]["registers"] == 5
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["schema"] == "phreg.eval/1" and saved["ttr"]["count"] == 2 and saved["summary"] == r["summary"]
    report = (tmp_path / "eval" / "report.html").read_text()
    assert "<th>test-time registers</th><th>PH-Reg student</th><th>both</th>" in report
    assert "Outliers per block, both tails" in report and "2 register neurons" in report
    card = eval_table(r)
    assert card.splitlines()[0] == "| metric | teacher | test-time registers | PH-Reg student | both | better |"
    assert read_eval(tmp_path / "eval")[0]["summary"] == r["summary"]  # push reads it as before


def test_dense_features_take_test_time_registers(tiny, tmp_path):
    x = torch.randn(2, 3, 28, 28)
    fixed = add_test_time_registers(tiny, {0: [3, 7]})
    with torch.no_grad():
        want = dense_features(fixed, x, "last_block")
        assert torch.equal(dense_features(tiny, x, "last_block", ttr={0: [3, 7]}), want)
        side = tmp_path / "test_time_registers.json"
        side.write_text(json.dumps(dict(schema="phreg.ttr/1", base={}, neurons={"0": [3, 7]})))
        assert torch.equal(dense_features(tiny, x, "last_block", ttr=side), want)
        assert torch.equal(dense_features(tiny, x, ttr="none"), dense_features(tiny, x))
        assert not torch.equal(want, dense_features(tiny, x, "last_block"))


def test_ttr_mistakes_are_one_line(tmp_path, capsys):
    folder = images_folder(tmp_path)
    assert main(["eval", "--teacher", MODEL, "--images", str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "--student is required, unless --teacher and --ttr" in capsys.readouterr().err
    assert main(["eval", "--teacher", MODEL, "--ttr", str(tmp_path / "nope.json"), "--images", str(folder),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--ttr" in err and "neither none, find nor" in err and len(err.strip().splitlines()) == 1
    assert main(["inspect", MODEL, "--images", str(folder), "--ttr", "finds"]) == 2
    assert main(["segment", MODEL, "--images", str(folder), "--classes", "c.csv", "--out", str(tmp_path / "s"),
                 "--ttr", "finds"]) == 2
    assert "--ttr: finds is neither" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "phreg.eval/1"}')
    from phreg.errors import UsageError
    from phreg.ttr.sidecar import read_sidecar
    with pytest.raises(UsageError, match="not a test-time-register sidecar"):
        read_sidecar(bad)


def test_the_recipe_switch_is_checked_before_torch(tmp_path, capsys):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    code = main(["distill", str(recipe), f"output_dir={tmp_path / 'run'}", f"model.teacher_ttr={tmp_path / 'x'}"])
    assert code == 2 and "model.teacher_ttr" in capsys.readouterr().err


def test_the_cache_key_changes_only_with_the_switch(tmp_path):
    from phreg.config.recipe import load_recipe
    from phreg.targets.cache import cache_key

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    plain, again = load_recipe(recipe), load_recipe(recipe, ["model.teacher_ttr=none"])
    found = load_recipe(recipe, ["model.teacher_ttr=find"])
    assert cache_key(plain, []) == cache_key(again, []) != cache_key(found, [])
