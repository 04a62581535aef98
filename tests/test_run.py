"""The run folder (`phreg.run`): what "finished" means, found without torch."""

import subprocess
import sys

from conftest import fake_run

from phreg.run import folder as layout


def test_finished_needs_summary_export_and_newest_checkpoint_of_one_step(tmp_path):
    cases = {  # (summary, export, checkpoints) -> finished?
        (3, 3, (1, 3)): True,
        (3, 3, ()): True,  # checkpoints deleted after a finished run
        (None, 3, (3,)): False,  # `phreg export` of a stopped run: no summary vouches for it
        (3, 2, (3,)): False,  # an export rebuilt from an older checkpoint
        (3, 3, (3, 5)): False,  # resumed to train longer: the newest checkpoint is past the summary
        (3, None, (3,)): False,  # export removed
    }
    for i, ((s, e, c), want) in enumerate(cases.items()):
        root = tmp_path / str(i)
        root.mkdir()
        assert layout.finished(fake_run(root / "run", c, e, s)) is want, (s, e, c)


TORCH_FREE = ["phreg.cli", "phreg.commands", "phreg.config.recipe", "phreg.run.folder", "phreg.run.lock",
              "phreg.run.training_list", "phreg.files.atomic", "phreg.files.paths", "phreg.data.scan",
              "phreg.data.split", "phreg.models.names", "phreg.models.weights", "phreg.ttr.sidecar",
              "phreg.eval.inputs", "phreg.eval.tables"]


def test_run_folders_and_the_command_line_s_checks_need_no_torch():
    """What every command checks before loading a model (the run folder, paths, names, images, masks, sidecars)
    imports without torch: a mistake is answered in a fraction of a second."""
    code = f"import sys, importlib; [importlib.import_module(m) for m in {TORCH_FREE!r}]; " \
           "assert 'torch' not in sys.modules, 'torch was imported'"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
