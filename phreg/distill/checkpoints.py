"""Checkpoints of a run: `RUN/checkpoints/step_N/`, written whole or not at all, found newest first.

Kept apart from the loop so that export (and anything else that reads a run) can find checkpoints without importing
the training code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from accelerate import Accelerator


def latest_checkpoint(run: Path) -> Path | None:
    done = sorted((run / "checkpoints").glob("step_*[0-9]"), key=lambda p: int(p.name.split("_")[1]))
    return done[-1] if done else None


def save_checkpoint(acc: Accelerator, run: Path, step: int, keep_last: int) -> None:
    """`save_state` into a temporary folder, renamed when complete, so --resume never sees half a checkpoint."""
    final, tmp = run / "checkpoints" / f"step_{step:08d}", run / "checkpoints" / f".step_{step:08d}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted((run / "checkpoints").glob("step_*[0-9]"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
