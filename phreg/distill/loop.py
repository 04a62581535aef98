"""The distillation loop: images -> views -> teacher targets; student -> loss -> step -> export.

Runs the same under `python -m phreg`, `phreg distill` and `accelerate launch -m phreg distill` (DDP): HF Accelerate
does the device placement, bf16 autocast and gradient sync. The parts live in their own modules: the step
(`step.py`), setting a run up (`session.py`), resume rules (`resume.py`), what it logs (`progress.py`), checkpoints
(`checkpoints.py`, the folder layout in `phreg.run`), stop signals (`preempt.py`).
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path

import timm
import torch
from accelerate import Accelerator

from .. import __version__
from ..backbones import backbone
from ..errors import Aborted, UsageError  # noqa: F401  (Aborted: raised here, imported from here by callers)
from ..files.atomic import write_json, writing
from ..data.scan import data_record
from ..hub.export import export_dtype, export_metadata, export_student
from ..run.lock import hold
from ..models.names import timm_name
from ..models.weights import find_weights
from ..config.recipe import Recipe, TrainCfg, recipe_hash, to_dict
from ..run.folder import EXPORT, METRICS, SUMMARY, TEXT_FILE
from .checkpoints import save_checkpoint
from .preempt import StopRequests
from ..errors import stopped
from .progress import Progress, TrainState
from .resume import Start
from .session import Session, set_up
from .step import lr_factor, make_accelerator, train_step  # noqa: F401  (lr_factor: imported from here by tests)


def distill(recipe: Recipe, resume: bool = False, cpu: bool = False, quiet: bool = False,
            auto_resume: bool = False, verbose: bool = False) -> Path:
    """Train a student for `recipe`; returns the run folder (with `export/` when it finished).

    resume: continue from the newest valid checkpoint (damaged ones are moved aside). auto_resume: resume when the run
    folder has a checkpoint, start fresh when it has none. A resumed recipe may raise train.epochs / train.max_steps:
    the lr schedule is then the one the longer plan defines at each step (see docs/clusters.md).
    verbose: print the unlocked-parameter table whole (it is always written to RUN/unlocked.txt).
    The run folder is held by this process (its main process under DDP) until it returns: a second writer is refused
    (`phreg.run.lock`).
    Stops with `Preempted` after writing a checkpoint on a stop signal, with `Interrupted` (a KeyboardInterrupt, so
    that pytest, a notebook or a script stops as Ctrl-C means) after writing one on Ctrl-C; a second Ctrl-C raises a
    plain KeyboardInterrupt at once.
    """
    run = Path(recipe.output_dir)
    recipe.model.name = timm_name(recipe.model.name)  # an alias (`dinov2_vits14`): the run records timm's name
    main = int(os.environ.get("RANK", 0)) == 0  # before Accelerate: the main process of a launch holds the lock
    with hold(run, "phreg distill") if main else contextlib.nullcontext():  # one writer per run folder
        return _distill(recipe, run, resume, cpu, quiet, auto_resume, verbose)


def _distill(recipe: Recipe, run: Path, resume: bool, cpu: bool, quiet: bool, auto_resume: bool,
             verbose: bool) -> Path:
    start = Start(run, recipe, resume, auto_resume)
    if start.done:
        if not quiet:
            print(f"{run} already finished at step {start.step}; nothing to do")
        return run
    began = time.perf_counter()
    acc = make_accelerator(recipe, cpu, run)
    s = set_up(recipe, acc, run, start, quiet, verbose)
    scored, wall = _train(recipe, s, quiet)
    _finish(recipe, s, scored, wall, began, quiet)
    return run


def _train(recipe: Recipe, s: Session, quiet: bool) -> tuple[dict | None, float]:
    """The loop: steps to the end of the plan, log lines, held-out scores and checkpoints. A stop signal or Ctrl-C
    writes a checkpoint and raises `Preempted` / `Interrupted`. Returns the latest held-out score and the training
    time."""
    acc, state, cfg, params = s.acc, s.state, recipe.train, s.parts.params  # the unlocked parameters, gathered once
    progress = Progress(acc, s.run / METRICS, s.total, state.step, quiet)
    scored = None  # the latest held-out score
    resumed_at = state.step if s.resumed else None
    with StopRequests(acc, cfg.stop_signals, cfg.save_every_minutes) as stop:
        while state.step < s.total:
            epoch, skip = divmod(state.step, s.steps_per_epoch)
            batches = acc.skip_first_batches(s.loader, skip * cfg.grad_accum) if skip else s.loader
            batches.set_epoch(epoch)  # Accelerate's loaders re-set the sampler's epoch from their own counter
            for batch in batches:
                loss, found_inf = train_step(acc, s.student_tokens, s.parts.targets, s.optimizer, params, batch, cfg)
                progress.add(loss, len(batch["pixels"]) * acc.num_processes, found_inf)
                s.bad.update(batch["bad"])
                if found_inf is None:  # accumulating gradients
                    continue
                lr = s.scheduler.get_last_lr()[0]
                s.scheduler.step()
                state.step += 1
                if state.step % cfg.log_every == 0 or state.step == s.total:
                    progress.log(state, epoch, lr)
                    _check_finite(state, cfg, s.total)
                if s.heldout and cfg.eval_every and state.step % cfg.eval_every == 0:
                    scored = _score(s, progress, quiet)
                stopping, due = stop.poll()
                if state.step >= s.total:
                    break
                if stopping or due or (cfg.save_every and state.step % cfg.save_every == 0):
                    if progress.micro:  # images seen and non-finite steps reach `state` at a log line
                        progress.log(state, epoch, lr)
                    where = _save(s, cfg, stop)
                if stopping:
                    progress.close()
                    stop.settle()
                    acc.end_training()
                    raise stopped(state.step, where, stop.requested)
        if resumed_at != state.step:  # not when a finished run was resumed at its last step
            _save(s, cfg, stop)
    wall = time.perf_counter() - progress.start
    if s.heldout and not (scored and scored["step"] == state.step):
        scored = _score(s, progress, quiet)
    progress.close()
    return scored, wall


def _check_finite(state: TrainState, cfg: TrainCfg, total: int) -> None:
    """Abort past `train.max_nonfinite` non-finite steps, or past `train.max_nonfinite_share` of the run's steps (a
    4-step run with 2 NaN steps is not a run to export). A run that never took a finite step is refused by `_finish`."""
    if state.nonfinite > min(cfg.max_nonfinite, int(cfg.max_nonfinite_share * total)):
        limit = f"train.max_nonfinite={cfg.max_nonfinite}, train.max_nonfinite_share={cfg.max_nonfinite_share} " \
                f"of {total} steps"
        raise Aborted(f"{state.nonfinite} of {state.step} steps had a non-finite loss or gradient ({limit}); nothing "
                      f"exported; lower train.lr or check the data")


def _score(s: Session, progress: Progress, quiet: bool) -> dict:
    result = s.heldout.result(s.parts.student, s.state.step)
    progress.log_heldout(result, quiet)
    return result


def _save(s: Session, cfg: TrainCfg, stop: StopRequests) -> Path:
    stop.saving = True  # signals now wait until the checkpoint is complete
    try:
        return save_checkpoint(s.acc, s.run, s.state.step, cfg.keep_last, s.student_tokens, s.optimizer,
                               dict(train=s.state.state_dict(), base=s.base))
    finally:
        stop.saving = False
        stop.saved()


def _finish(recipe: Recipe, s: Session, scored: dict | None, wall: float, began: float, quiet: bool) -> None:
    """The export and `summary.json` (what the model card is made of), written by the main process."""
    acc, run, parts = s.acc, s.run, s.parts
    say = (lambda *a: None) if quiet else acc.print
    if s.state.step and s.state.nonfinite >= s.state.step:  # every process: none exports, none waits
        raise Aborted(f"none of the {s.state.step} steps had a finite loss and gradient: the student is the base model "
                      f"with untrained registers; nothing exported (its checkpoint is in {run / 'checkpoints'}); lower "
                      f"train.lr or check the data")
    if acc.is_main_process:
        export_s = time.perf_counter()
        export_student(parts.student, run / EXPORT, mean=parts.mean, std=parts.std,
                       metadata=export_metadata(recipe, s.state.step), text_tower=run / TEXT_FILE,
                       local_weights=find_weights(recipe.model).local(recipe.model.name), dtype=export_dtype(recipe))
        export_s = time.perf_counter() - export_s
        timings = dict(total_s=round(time.perf_counter() - began, 1), cache_s=round(s.cache_s, 1),
                       train_s=round(wall, 1), export_s=round(export_s, 1))
        with writing("the run summary", run / SUMMARY):
            write_json(run / SUMMARY, _summary(recipe, s, scored, wall, timings))
        if s.unreadable or s.bad:
            say(f"skipped {len(s.unreadable) + len(s.bad)} unreadable image file(s); see {run / SUMMARY}")
        total_s = time.perf_counter() - began
        say(f"exported {run / EXPORT} in {export_s:.1f}s; the run took {total_s:.0f}s: "
            + (f"caching teacher targets {s.cache_s:.0f}s, " if recipe.cache.enabled else "")
            + f"training {wall:.0f}s, setup and the rest {max(0.0, total_s - s.cache_s - wall - export_s):.0f}s")
    acc.wait_for_everyone()
    acc.end_training()


def _summary(recipe: Recipe, s: Session, scored: dict | None, wall: float, timings: dict) -> dict:
    """summary.json: what was trained, on what, from which weights, how long: the model card's record."""
    m, parts, state = recipe.model, s.parts, s.state
    student = backbone(parts.student)
    return dict(
        phreg_version=__version__, base_model=m.name, recipe_hash=recipe_hash(recipe), steps=state.step,
        images_seen=state.images, wall_s=round(wall, 1), nonfinite_steps=state.nonfinite,
        unreadable_files=[str(p) for p in s.unreadable], undecodable_files=sorted(s.bad),
        heldout=scored, hardware=_hardware(s.acc), timings=timings,
        versions=dict(torch=torch.__version__, timm=timm.__version__),
        # what the model card says the student was made from (hashed once, at the start)
        weights={k: v for k, v in s.base.items() if k != "mtime_ns"},
        registers=dict(present=student.num_registers - m.registers, added=m.registers,
                       total=student.num_registers),
        teacher_ttr=parts.teacher_ttr,  # test-time registers the targets were read with (model.teacher_ttr)
        # what trained, as the card lists it: each unlock group's resolved patterns and its lr scale
        unlocked=[[names, g.lr_scale] for g in recipe.train.unlock if (names := student.resolve(g.params))],
        data=data_record(recipe.data, s.files, s.val_files),
        recipe=to_dict(recipe))


def _hardware(acc: Accelerator) -> dict:
    dev = torch.cuda.get_device_name(acc.device) if acc.device.type == "cuda" else platform.processor() or "cpu"
    return dict(device=str(acc.device), name=dev, processes=acc.num_processes, precision=str(acc.mixed_precision),
                torch_threads=torch.get_num_threads())
