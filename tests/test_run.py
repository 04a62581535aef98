"""The run folder (`phreg.run`): what "finished" means, found without torch."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from phreg.run import folder as layout


def make_run(root: Path, summary_step=None, export_step=None, checkpoints=()) -> Path:
    run = root / "run"
    run.mkdir()
    (run / layout.RECIPE).write_text("seed: 0\n")
    if summary_step is not None:
        (run / layout.SUMMARY).write_text(json.dumps(dict(steps=summary_step)))
    if export_step is not None:
        (run / layout.EXPORT).mkdir()
        save_file({"w": np.zeros(2, np.float32)}, str(run / layout.EXPORT / layout.WEIGHTS),
                  metadata=dict(steps=str(export_step)))
    for step in checkpoints:
        (run / layout.CHECKPOINTS / f"step_{step:08d}").mkdir(parents=True)
    return run


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
        assert layout.finished(make_run(root, s, e, c)) is want, (s, e, c)


def test_a_run_folder_is_read_without_torch():
    code = "import sys, phreg.run, phreg.files; assert 'torch' not in sys.modules, 'torch was imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
