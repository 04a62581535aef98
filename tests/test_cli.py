"""The command line: user mistakes are one line on stderr, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors.torch
import timm
from conftest import MODEL, fake_run, one_line, phreg

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def usage_error(result, message: str, run: Path | None = None) -> None:
    one_line(result, 2, message, untouched=run)


@pytest.fixture
def quick(tmp_path, dinov2_file):
    """Arguments for a tiny distill of the quickstart recipe into tmp_path/run."""
    return [RECIPES / "quickstart.yaml", f"output_dir={tmp_path / 'run'}", f"model.checkpoint={dinov2_file}",
            "model.img_size=56", "train.max_steps=1", "views.num=2", "data.num_workers=0"]


def test_empty_folder(tmp_path, quick):
    (tmp_path / "empty").mkdir()
    usage_error(phreg("distill", *quick, f"data.root={tmp_path / 'empty'}"), "no image files", tmp_path / "run")


def test_only_corrupt_files(tmp_path, quick):
    (tmp_path / "bad").mkdir()
    for name in ("a.jpg", "b.png", "c.webp"):
        (tmp_path / "bad" / name).write_bytes(os.urandom(300))
    usage_error(phreg("distill", *quick, f"data.root={tmp_path / 'bad'}"),
                       "no usable image", tmp_path / "run")


def test_unknown_recipe_key(tmp_path, quick):
    usage_error(phreg("distill", *quick, "train.learning_rate=1e-4"), "unknown recipe key train.learning_rate",
                       tmp_path / "run")


@pytest.mark.slow
def test_resolution_not_a_multiple_of_the_patch(tmp_path, quick):
    usage_error(phreg("distill", *quick, "model.img_size=230"),
                       "model.img_size=230 is not a multiple of the patch size 14; nearest valid sizes: 224, 238",
                       tmp_path / "run")


@pytest.mark.slow
def test_missing_weights_offline(tmp_path, quick):
    args = [a for a in quick if not str(a).startswith("model.checkpoint")]
    result = phreg("distill", *args, env={"PHREG_CHECKPOINTS": str(tmp_path / "none")})
    usage_error(result, f"no weights for {MODEL} (HF_HUB_OFFLINE is set, nothing cached): "
                               "pass model.checkpoint=FILE or put the file at",
                       tmp_path / "run")


@pytest.mark.slow
def test_checkpoint_of_the_wrong_architecture(tmp_path, quick):
    safetensors.torch.save_file(timm.create_model("vit_tiny_patch16_224").state_dict(), str(tmp_path / "t.safetensors"))
    usage_error(phreg("distill", *quick, f"model.checkpoint={tmp_path / 't.safetensors'}"),
                       f"does not fit {MODEL}", tmp_path / "run")


def test_recipe_file_missing_and_bad_override(tmp_path):
    usage_error(phreg("distill", tmp_path / "nope.yaml"), "not found")
    usage_error(phreg("distill", RECIPES / "quickstart.yaml", "train.epochs=many"),
                       "recipe key train.epochs: expected an integer")


@pytest.mark.slow
def test_resume_without_checkpoint_and_rerun_into_a_used_folder(tmp_path, quick):
    usage_error(phreg("distill", *quick, "--resume"), "--resume: no checkpoint")
    assert phreg("distill", *quick, "--quiet").returncode == 0
    usage_error(phreg("distill", *quick), "already holds a finished run (step 1, export written); to train it "
                                                 "longer pass --resume with a larger train.max_steps")


def test_help_and_version():
    out = phreg("distill", "--help")
    assert out.returncode == 0 and "key=value" in out.stdout and "--resume" in out.stdout
    assert phreg("--version").stdout.startswith("phreg ")
    assert phreg().returncode == 2


def test_a_used_output_dir_is_refused_before_any_model_loads(tmp_path):
    from phreg.commands.distill import check as check_distill
    from phreg.config.recipe import load_recipe
    from phreg.errors import UsageError

    (tmp_path / "run" / "checkpoints" / "step_00000002").mkdir(parents=True)
    recipe = load_recipe(RECIPES / "quickstart.yaml", [f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(UsageError, match="already holds a run; pass --resume"):
        check_distill(recipe)
    check_distill(recipe, resuming=True)  # which checkpoint to use is distill's (verified) decision


@pytest.mark.parametrize("override, message", [
    ("model.img_size=225", "model.img_size=225 is not a multiple of the patch size 14; nearest valid sizes: 224, 238"),
    ("model.name=vit_smal_patch14_dinov2", "model.name 'vit_smal_patch14_dinov2' is not a timm model; closest: "
                                           "vit_small_patch14_dinov2"),
])
def test_a_used_output_dir_does_not_hide_the_recipe_s_own_mistake(tmp_path, override, message):
    """With output_dir holding a run, a bad img_size or a misspelt model name gets its own error, not "pass --resume"
    (which would fail again on the same mistake)."""
    from phreg.commands.distill import check as check_distill
    from phreg.config.recipe import load_recipe
    from phreg.errors import UsageError

    fake_run(tmp_path / "run", checkpoints=[2], recipe="output_dir: x\n")
    recipe = load_recipe(RECIPES / "quickstart.yaml", [f"output_dir={tmp_path / 'run'}", override])
    with pytest.raises(UsageError) as e:
        check_distill(recipe)
    assert message in str(e.value), str(e.value)


def test_a_finished_run_is_said_to_be_finished_not_told_to_resume(tmp_path):
    from phreg.commands.distill import check as check_distill
    from phreg.config.recipe import load_recipe
    from phreg.distill.resume import Start
    from phreg.errors import UsageError

    run = fake_run(tmp_path / "run", checkpoints=[7], export_step=7, summary_step=7, recipe="output_dir: x\n")
    recipe = load_recipe(RECIPES / "quickstart.yaml", [f"output_dir={run}"])
    for check in (lambda: check_distill(recipe), lambda: Start(run, recipe, resume=False, auto_resume=False)):
        with pytest.raises(UsageError) as e:
            check()
        assert str(e.value) == (f"{run} already holds a finished run (step 7, export written); to train it longer "
                                "pass --resume with a larger train.max_steps or train.epochs, or choose another "
                                "output_dir")


def test_each_usage_message_is_written_once():
    """A check lives in one place (the domain it guards: `models/names.py`, `data/split.py`, `eval/inputs.py`, ...)
    and everything that needs it calls it: the text of every `UsageError(...)` in the package (its literal pieces of
    20+ characters) appears in one call only."""
    import ast
    from collections import defaultdict

    package = Path(__file__).resolve().parents[1] / "phreg"
    where = defaultdict(list)
    for file in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "UsageError" and node.args:
                for piece in ast.walk(node.args[0]):
                    literal = isinstance(piece, ast.Constant) and isinstance(piece.value, str)
                    text = piece.value.strip(" :;,.()") if literal else ""
                    if len(text) >= 20:
                        where[text].append(f"{file.relative_to(package)}:{node.lineno}")
    twice = {text: lines for text, lines in where.items() if len(lines) > 1}
    assert not twice, twice
    assert len(where) > 100  # the walk does find the package's messages
