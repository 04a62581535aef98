"""`phreg inspect` and `phreg eval` name each picture after its image and title it with the image's file name
(they were `image_00.png`, `compare_0.png`, titled with the model name only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import timm
import torch
from conftest import MODEL
from PIL import Image

NAMES = ["a.png", "norm_histogram.jpg", "street scene #2.png", "sub/A.png"]


def images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in NAMES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(root / name)
    return root


def tiny(name: str):
    from phreg.backbones import add_registers
    from phreg.models.specs import Loaded

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, depth=2, img_size=28).eval()
    return Loaded(model, name, 28, (0.5,) * 3, (0.5,) * 3), Loaded(add_registers(model, 4), "student", 28,
                                                                     (0.5,) * 3, (0.5,) * 3)


def test_picture_names_are_safe_unique_and_leave_other_files_alone():
    from phreg.eval.figures import picture_names

    assert picture_names([Path(n) for n in NAMES], taken=("norm_histogram.png",)) == \
        ["a.png", "norm_histogram_2.png", "street_scene__2.png", "A_2.png"]  # a.png and A.png: one file on macOS
    assert picture_names([Path("x/.hidden.png"), Path("é.jpg")], "compare_") == ["compare_hidden.png",
                                                                                 "compare__.png"]


def test_inspect_and_eval_pictures_are_named_and_titled_after_their_images(tmp_path, monkeypatch):
    from phreg.eval import evaluate as ev, inspection
    from phreg.eval.evaluate import EvalOptions, evaluate
    from phreg.eval.inspection import inspect_model

    root = images(tmp_path / "images")
    teacher, student = tiny("tiny-model")
    titles = []
    for module in (inspection, ev):
        real = module.panels
        monkeypatch.setattr(module, "panels", lambda *a, real=real, **k: titles.append(k.get("title")) or
                            real(*a, **k))
    s = inspect_model(teacher, root, tmp_path / "inspect", views=2, pictures=4)
    assert s["figures"] == ["a.png", "norm_histogram_2.png", "street_scene__2.png", "A_2.png", "norm_histogram.png"]
    assert titles == NAMES
    assert json.loads((tmp_path / "inspect" / "inspect.json").read_text())["figures"] == s["figures"]
    assert all((tmp_path / "inspect" / f).read_bytes()[:4] == b"\x89PNG" for f in s["figures"])

    titles.clear()
    r = evaluate(student, teacher, root, tmp_path / "eval", EvalOptions(views=2, pictures=2))
    assert r["figures"] == ["compare_a.png", "compare_norm_histogram.png", "norm_histogram.png"]
    assert titles == NAMES[:2]
    html = (tmp_path / "eval" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "alt='compare_a.png'" in html
