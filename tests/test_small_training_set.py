"""A batch larger than the training set is clipped to it, and the run says so (and so does its model card): every
step then trains on all the images, which the recipe's batch size no longer describes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import MODEL

from phreg.cli import main

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def test_the_line_says_what_the_loader_does():
    from phreg.distill.session import clipped_batch

    assert clipped_batch(3, 3, 1) is None and clipped_batch(8, 4, 2) is None
    assert clipped_batch(3, 8, 1) == ("train.batch_size=8 is more than the 3 training images: the batch is clipped to "
                                      "them, every step trains on all 3")
    assert clipped_batch(5, 4, 2).startswith("train.batch_size=4 x 2 processes is more than the 5 training images")


@pytest.mark.slow  # a (one-step) training run
def test_a_run_on_fewer_images_than_a_batch_says_it_and_its_card_too(tmp_path, capsys, dinov2_file):
    run = tmp_path / "run"
    assert main(["distill", str(QUICKSTART), f"output_dir={run}", f"model.name={MODEL}",
                 f"model.checkpoint={dinov2_file}", "model.img_size=28", "model.registers=2", "views.num=2",
                 "cache.enabled=false", "train.batch_size=8", "train.max_steps=1", "train.warmup_steps=0",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("train.batch_size=8 is more than the 3 training images: the batch is clipped to them, every "
                     "step trains on all 3") == 1, out
    assert main(["push", str(run), "--repo-id", "alice/tiny", "--dry-run", str(tmp_path / "hub")]) == 0
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "batch 3 (train.batch_size 8, clipped to the 3 training images)" in card
