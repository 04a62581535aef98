"""A run in its first seconds (the lock taken, recipe.yaml not yet written) is said to be one by the commands that
read a run folder, not "not a phreg run folder"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from phreg.cli import main

HOLD = """
import sys, time
from phreg.run.lock import hold
with hold(sys.argv[1], "phreg distill"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_export_of_a_starting_run_says_it_is_being_written(tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (["export", str(run)], ["export", str(run), "--out", str(tmp_path / "elsewhere")],
                     ["push", str(run), "--repo-id", "alice/x", "--dry-run", str(tmp_path / "hub")]):
            assert main(args) == 2, args
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"{run} is being written by phreg distill on host" in err[-1], err
            assert f"PID {holder.pid}" in err[-1] and "not a phreg run folder" not in err[-1]
            assert ("push publishes a run once it has finished" if args[0] == "push" else
                    "it is starting and has written no recipe.yaml or checkpoint yet") in err[-1]
        assert sorted(p.name for p in run.iterdir()) == [".phreg.lock"]  # nothing written beside the lock
    finally:
        holder.kill()
        holder.wait()
    assert main(["export", str(run)]) == 2  # the holder gone: an empty folder is not a run
    assert "is not a phreg run folder (no recipe.yaml)" in capsys.readouterr().err
