"""The rules of a resumed run: which folder state means what, what a resumed recipe may change, and where it goes on.

* A fresh run refuses a folder that holds checkpoints; `--resume` needs one; `--auto-resume` resumes when there is one
  (the same command for the first start and every requeue) and does nothing for a run that already finished.
* A resumed recipe may differ from the saved one only in bookkeeping (where and how often it reports and
  checkpoints) and, to extend a run, in its length; the lr schedule is then the one of the longer plan.
* Training continues from the newest checkpoint that verifies (damaged ones are moved aside), and metrics rows logged
  after that checkpoint (a crash, not a preemption) are dropped, so they are logged once.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

from ..config.recipe import Recipe, TrainCfg, load_recipe, to_dict
from ..errors import UsageError
from ..run.folder import (RECIPE, cache_build_unfinished, cache_folder, checkpoint_step, finished, latest_checkpoint,
                          newest_valid, used_folder)
from .progress import flat

# Keys a resumed run may change: where and how often it reports and checkpoints and the dtype it exports in (they do
# not change the weights), and, to extend a run, how long it trains.
BOOKKEEPING = {"output_dir", "data.num_workers", "train.log_every", "train.eval_every", "train.save_every",
               "train.save_every_minutes", "train.keep_last", "train.trackers", "train.stop_signals", "export.dtype"}
LENGTH = {"train.epochs", "train.max_steps"}


def changed_keys(old: Recipe, new: Recipe) -> set[str]:
    a, b = flat(to_dict(old)), flat(to_dict(new))
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def started_with(run: Path, recipe: Recipe, flag: str) -> Recipe | None:
    """The recipe `run` was started with, if any; refuses one that differs in more than length and bookkeeping."""
    saved = run / RECIPE
    if not saved.is_file():
        return None
    old = load_recipe(saved)
    differs = changed_keys(old, recipe) - BOOKKEEPING - LENGTH
    if differs:
        again = shlex.join(["phreg", "distill", str(saved), f"output_dir={run}", flag])
        raise UsageError(f"{flag}: the recipe differs from the one {run} was started with ({saved}) in "
                         f"{', '.join(sorted(differs))}; a resumed run may only train longer (train.epochs, "
                         f"train.max_steps); resume it as it was started with: {again}")
    return old


def planned_steps(cfg: TrainCfg, steps_per_epoch: int) -> int:
    return cfg.max_steps or cfg.epochs * steps_per_epoch


class Start:
    """How `distill` begins in `run`: fresh, or resumed (with the recipe the run was started with), or not at all
    (`done`: an --auto-resume of a run that already finished)."""

    def __init__(self, run: Path, recipe: Recipe, resume: bool, auto_resume: bool):
        self.flag = "--auto-resume" if auto_resume and not resume else "--resume"
        found = latest_checkpoint(run)
        if resume and found is None and cache_build_unfinished(cache_folder(recipe, run)):
            resume = False  # stopped while building the target cache: a fresh start continues the build
        self.resume = resume or (auto_resume and found is not None)
        self.old: Recipe | None = None
        self.done = False
        if self.resume and found is None:
            raise UsageError(f"--resume: no checkpoint in {run / 'checkpoints'} (and no target cache build to "
                             f"continue); run the same command without --resume to start")
        if not self.resume and found is not None:
            from ..models.names import check_architecture

            check_architecture(recipe.model, recipe.views)  # the recipe's own mistake first, as `phreg distill` says it
            raise used_folder(run)
        if self.resume:
            self.old = started_with(run, recipe, self.flag)
            self.done = self.old is not None and finished(run) and not changed_keys(self.old, recipe) & LENGTH
            self.step = checkpoint_step(found)
        elif auto_resume and (run / "export").is_dir():  # no checkpoint left, but a finished export
            started_with(run, recipe, self.flag)

    def checkpoint(self, acc, run: Path) -> Path:
        """The checkpoint to resume from: the main process verifies and moves damaged ones aside, then every process
        sees the same newest one."""
        if acc.is_main_process:
            newest_valid(run)
        acc.wait_for_everyone()
        checkpoint = latest_checkpoint(run)
        if checkpoint is None:
            raise UsageError(f"{self.flag}: no valid checkpoint left in {run / 'checkpoints'} (damaged ones were "
                             f"moved aside, see above); start again without {self.flag} into another output_dir")
        return checkpoint

    def check_length(self, run: Path, step: int, total: int, steps_per_epoch: int) -> int:
        """A resumed run may train longer, never shorter; returns the steps it was planned for."""
        planned = planned_steps(self.old.train, steps_per_epoch) if self.old else total
        if total < max(planned, step):
            raise UsageError(f"{self.flag}: {run} was planned for {planned} steps and is at step {step}; a resumed "
                             f"run can train longer (train.epochs, train.max_steps) but not shorter ({total} steps)")
        return planned


def trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics.jsonl rows up to `step` (and drop a row torn by a crash); temporary file + rename."""
    def logged_at(line: str) -> float:
        try:
            row = json.loads(line)
            return row["step"] if "step" in row else row["heldout"]["step"]
        except (ValueError, KeyError, TypeError):
            return math.inf

    if path.is_file():
        rows = path.read_text().splitlines(keepends=True)
        kept = [r for r in rows if logged_at(r) <= step]
        if len(kept) != len(rows):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(r if r.endswith("\n") else r + "\n" for r in kept))
            os.replace(tmp, path)
