"""What the model card says about a run in numbers: the extra tokens' share, the run's own held-out distance next to
the eval's (why an image has two), the batch a small training set allows."""

from __future__ import annotations

from pathlib import Path

import pytest

from phreg.config.recipe import load_recipe
from phreg.hub.card import Run, model_card

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def card(size: int, patch: int, present: int = 0, summary: dict | None = None, report: dict | None = None,
         *overrides: str) -> str:
    """The card of a DINOv2-like run at `size` px with 16 registers added (and `present` in the teacher)."""
    patches = (size // patch) ** 2
    geometry = dict(prefix=1 + present + 16, registers=present + 16, class_token=True, patches=patches,
                    grid=[size // patch] * 2, patch=patch, width=384, model_class="VisionTransformer",
                    unlocked=[(["reg_token"], 1.0)], init="pos_mean")
    recipe = load_recipe(QUICKSTART, [f"model.img_size={size}", *overrides])
    summary = summary or {}
    summary.setdefault("registers", dict(present=present, added=16, total=present + 16))
    return model_card(Run(Path("run"), recipe, summary, {}, {}, geometry, report, None), "alice/tiny")


@pytest.mark.parametrize("size, patch, present, share", [
    (112, 14, 0, 25),  # 16 more on 1 + 64 tokens; the card said "about 20%" (16 of the student's 81)
    (224, 14, 0, 6),  # 16 / (1 + 256)
    (64, 16, 4, 76),  # DINOv3-like, 4 registers already: 16 / (1 + 4 + 16)
])
def test_the_extra_tokens_are_counted_against_the_teachers_tokens(size, patch, present, share):
    teacher_tokens = 1 + present + (size // patch) ** 2
    assert round(100 * 16 / teacher_tokens) == share
    assert f"about {share}% more tokens per image" in card(size, patch, present)


def heldout_summary() -> dict:
    return dict(heldout=dict(step=20, teacher=0.0310, student=0.0290),
                data=dict(train=dict(folder="/data/camvid", images=50, file_list_sha256="0" * 64),
                          heldout=dict(images=2, source="data.val_split=0.04")))


def test_the_runs_held_out_distance_says_what_it_was_measured_with():
    text = card(112, 14, summary=heldout_summary())
    row = next(line for line in text.splitlines() if line.startswith("| held-out distance |"))
    assert "teacher 0.031, student 0.029" in row and "on the 2 held-out images" in row
    assert "with the recipe's 6 views per image at 112 px" in row and "evaluation below" not in row


def test_with_an_eval_the_card_says_why_an_image_has_two_distances():
    """The run's own score (6 views at the end of training) and the eval's (10 views, drawn again) of the same image
    differ; the card used to print both without a word."""
    report = {"schema": "phreg.eval/1", "images": 67, "views": 10, "img_size": 112, "summary": [
        {"metric": "denoised_distance", "label": "mean 1 - cos to TTA-denoised teacher features (17 never-trained "
         "images)", "teacher": 0.0308, "student": 0.0320, "better": "lower", "images": 17, "trained_images": 0}]}
    text = card(112, 14, summary=heldout_summary(), report=report)
    row = next(line for line in text.splitlines() if line.startswith("| held-out distance |"))
    assert "with the recipe's 6 views per image at 112 px" in row
    assert "The evaluation below scores 67 images again with its own 10 views per image at 112 px" in row
    assert "an image scored in both has two distances" in row
    assert "| mean 1 - cos to TTA-denoised teacher features (17 never-trained images) | **0.0308** | 0.032 |" in text


def test_a_batch_clipped_to_the_training_set_is_said_in_the_card():
    summary = heldout_summary()
    assert "batch 8 |" in card(112, 14, 0, summary, None, "train.batch_size=8")  # 50 images: batches of 8
    summary["data"]["train"]["images"] = 3
    assert "batch 3 (train.batch_size 8, clipped to the 3 training images)" in \
        card(112, 14, 0, summary, None, "train.batch_size=8")
