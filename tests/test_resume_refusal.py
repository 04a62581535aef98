"""A resume refused because the recipe changed gives the command that resumes the run as it was started."""

from __future__ import annotations

import shlex
from pathlib import Path

from phreg.cli import main
from phreg.config.recipe import load_recipe, save_recipe
from phreg.distill.resume import started_with

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def test_a_refused_resume_names_the_command_that_resumes_the_recorded_recipe(tmp_path, capsys):
    run = tmp_path / "my run"  # a space: the command must still be one a shell runs as is
    save_recipe(load_recipe(QUICKSTART, [f"output_dir={run}"]), run / "recipe.yaml")
    (run / "checkpoints" / "step_5").mkdir(parents=True)
    assert main(["distill", str(QUICKSTART), f"output_dir={run}", "train.lr=1e-3", "views.num=4", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from the one" in err[0] and "train.lr, views.num" in err[0], err
    again = f"phreg distill {shlex.quote(str(run / 'recipe.yaml'))} {shlex.quote(f'output_dir={run}')} --resume"
    assert err[0].endswith(f"resume it as it was started with: {again}"), err[0]
    words = shlex.split(again)  # what that command asks for is accepted
    assert started_with(run, load_recipe(words[2], words[3:4]), "--resume") is not None
