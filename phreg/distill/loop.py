"""The distillation loop: images -> views -> teacher targets; student -> loss -> step -> export.

Runs the same under `python -m phreg`, `phreg distill` and `accelerate launch -m phreg distill` (DDP): HF Accelerate
does the device placement, bf16 autocast, gradient sync and checkpoint state.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import __version__
from .cache import META, TargetCache, cache_bytes, cache_key
from .checkpoints import (checkpoint_dirs, checkpoint_step, latest_checkpoint, load_checkpoint, newest_valid,
                          save_checkpoint)
from .disk import check_space, writing
from .preempt import Preempted, StopRequests
from ..data import EpochSampler, ImageDataset, collate
from ..sources import ShardImages, open_sources
from ..errors import Aborted, UsageError  # noqa: F401  (Aborted: raised here, imported from here by callers)
from ..folders import data_record
from ..hub.export import export_metadata, export_student
from ..fastpath import set_fused_attention, teacher_autocast, teacher_precision, use_compile
from ..files import write_json
from ..denoise.heldout import HeldOut
from .loss import distill_loss
from .memory import estimate
from .unlock import unlock, unlocked_table
from ..backbones import PatchTokens, add_registers, backbone
from ..models import find_weights, load_teacher, normalization
from ..recipe import Recipe, TrainCfg, load_recipe, recipe_hash, save_recipe, to_dict
from ..denoise.targets import DenoisedTeacher
from ..clip.text import TEXT_FILE, load_text_tower


def lr_factor(cfg: TrainCfg, total_steps: int):
    """Multiplier of each group's base lr at optimizer step t: linear warmup, then exp / cosine / constant."""
    end = cfg.end_lr / cfg.lr

    def factor(t: int) -> float:
        if t < cfg.warmup_steps:
            return (t + 1) / cfg.warmup_steps
        p = min(1.0, (t - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        if cfg.schedule == "exp":
            return end ** p
        if cfg.schedule == "cosine":
            return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * p))
        return 1.0

    return factor


def skip_if_nonfinite(optimizer, grad_norm: torch.Tensor) -> torch.Tensor:
    """Fused AdamW skips its whole update, on device, when `found_inf` is 1 (the protocol torch's GradScaler uses),
    so a NaN/inf step is dropped without a host sync. The global grad norm is identical on every DDP rank."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.found_inf = (~torch.isfinite(grad_norm)).float()
    return inner.found_inf


class TrainState:
    """What a checkpoint must remember besides weights and optimizer (the lr schedule is a function of the step)."""

    def __init__(self):
        self.step, self.nonfinite, self.images = 0, 0, 0

    def state_dict(self) -> dict:
        return dict(step=self.step, nonfinite=self.nonfinite, images=self.images)

    def load_state_dict(self, d: dict) -> None:
        self.step, self.nonfinite, self.images = d["step"], d["nonfinite"], d["images"]


class Progress:
    """Loss, non-finite steps and throughput between log lines. They accumulate on the device and are read back (one
    host sync) only when a line is written to metrics.jsonl."""

    def __init__(self, acc: Accelerator, path: Path, total: int, initial: int, quiet: bool):
        self.acc, self.start, self.path = acc, time.perf_counter(), path
        self.loss, self.nonfinite = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
        self.micro, self.seen, self.tick = 0, 0, self.start
        with writing("metrics", path):
            self.file = open(path, "a") if acc.is_main_process else None
        self.bar = tqdm(total=total, initial=initial, disable=quiet or not acc.is_local_main_process, desc="distill")

    def add(self, loss: torch.Tensor, images: int, found_inf: torch.Tensor | None) -> None:
        self.loss += loss
        self.micro += 1
        self.seen += images
        if found_inf is not None:
            self.nonfinite += found_inf
            self.bar.update(1)

    def log(self, state: TrainState, epoch: int, lr: float) -> None:
        state.nonfinite += int(self.acc.reduce(self.nonfinite, "max").item())
        mean_loss = self.acc.reduce(self.loss, "mean").item() / self.micro
        now = time.perf_counter()
        state.images += self.seen
        self.write(dict(step=state.step, epoch=epoch, loss=round(mean_loss, 6), lr=lr,
                        images_per_s=round(self.seen / (now - self.tick), 3), nonfinite=state.nonfinite,
                        elapsed_s=round(now - self.start, 1)))
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{self.seen / (now - self.tick):.2f}")
        self.loss.zero_()
        self.nonfinite.zero_()
        self.micro, self.seen, self.tick = 0, 0, now

    def write(self, row: dict) -> None:
        """One line of metrics.jsonl; the same numbers go to the experiment trackers (`train.trackers`)."""
        if self.file:
            with writing("metrics", self.path):
                self.file.write(json.dumps(row) + "\n")
                self.file.flush()
        if self.acc.trackers:
            flat = {f"heldout/{k}": v for k, v in row["heldout"].items() if k != "step"} if "heldout" in row else row
            self.acc.log({k: v for k, v in flat.items() if k != "step"},
                         step=row["heldout"]["step"] if "heldout" in row else row["step"])

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()


def make_accelerator(recipe: Recipe, cpu: bool = False, run: Path | None = None) -> Accelerator:
    """bf16 autocast on GPU (fp32 master weights and loss), fp32 on CPU; torch.compile of the student through
    Accelerate's dynamo plugin (after DDP wrapping) when speed.compile says so; `train.trackers` through Accelerate's
    own tracker support, logging under RUN/logs (TensorBoard: RUN/logs/phreg/)."""
    gpu = torch.cuda.is_available() and not cpu
    cpu = cpu or not gpu  # Accelerate only sees `torchrun` processes on a GPU-less machine as MULTI_CPU when told
    precision = recipe.train.precision
    if precision == "auto":
        precision = "bf16" if gpu else "fp32"
    compile_ = use_compile(recipe.speed, torch.device("cuda" if gpu else "cpu"))
    return Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=cpu,
                       gradient_accumulation_steps=recipe.train.grad_accum,
                       dynamo_backend="inductor" if compile_ else "no",
                       dataloader_config=DataLoaderConfiguration(non_blocking=True),
                       log_with=list(recipe.train.trackers) if run is not None and recipe.train.trackers else None,
                       project_config=ProjectConfiguration(project_dir=str(run), logging_dir=str(run / "logs"))
                       if run is not None else None)


@dataclass
class Parts:
    """Everything a step needs, built the same way for training and for the benchmark."""
    teacher: DenoisedTeacher
    student: torch.nn.Module
    model: PatchTokens
    groups: list[dict]
    optimizer: torch.optim.Optimizer
    mean: tuple
    std: tuple
    notes: list = field(default_factory=list)  # semantic unlock parts the model lacks

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.groups for p in g["params"]]


def build_parts(recipe: Recipe, device: torch.device, precision: str = "fp32") -> Parts:
    m, cfg, speed = recipe.model, recipe.train, recipe.speed
    teacher = load_teacher(m).to(device)  # first, so the student's frozen tensors are the teacher's on the device too
    mean, std = normalization(teacher, m)
    student = add_registers(teacher, m.registers, m.register_init, m.register_noise, recipe.seed)
    for model in (teacher, student):
        set_fused_attention(model, speed.fused_attn)
    student.set_grad_checkpointing(speed.grad_checkpointing)  # timm recomputes each block in backward
    notes: list[str] = []
    groups = unlock(student, cfg.unlock, cfg.lr, cfg.weight_decay, notes)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                  fused=True)
    denoiser = DenoisedTeacher(teacher, recipe.views, mean, std, teacher_autocast(speed, device, precision),
                               compile=use_compile(speed, device), head=m.teacher_head, sigma=m.naclip_sigma)
    return Parts(denoiser.to(device), student, PatchTokens(student, m.student_head, m.naclip_sigma), groups, optimizer,
                 mean, std, notes)


def train_step(acc: Accelerator, model, teacher: DenoisedTeacher, optimizer, params, batch: dict,
               cfg: TrainCfg) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-batch: targets (cached, or the teacher's views), student forward, loss, backward; on the last
    micro-batch of a step, clip and update. Returns the loss and, on update steps, the non-finite flag (on device)."""
    found_inf = None
    with acc.accumulate(model):
        target = batch["target"] if "target" in batch else teacher(batch["image"], batch["plan"])
        loss = distill_loss(model(batch["image"]), target, cfg.mse_weight)
        acc.backward(loss)
        if acc.sync_gradients:
            found_inf = skip_if_nonfinite(optimizer, acc.clip_grad_norm_(params, cfg.grad_clip or float("inf")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), found_inf


# Keys a resumed run may change: where and how often it reports and checkpoints (they do not change the weights),
# and, to extend a run, how long it trains.
BOOKKEEPING = {"output_dir", "data.num_workers", "train.log_every", "train.eval_every", "train.save_every",
               "train.save_every_minutes", "train.keep_last", "train.trackers", "train.stop_signals"}
LENGTH = {"train.epochs", "train.max_steps"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def changed_keys(old: Recipe, new: Recipe) -> set[str]:
    a, b = _flat(to_dict(old)), _flat(to_dict(new))
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def started_with(run: Path, recipe: Recipe, flag: str) -> Recipe | None:
    """The recipe `run` was started with, if any; refuses one that differs in more than length and bookkeeping."""
    saved = run / "recipe.yaml"
    if not saved.is_file():
        return None
    old = load_recipe(saved)
    differs = changed_keys(old, recipe) - BOOKKEEPING - LENGTH
    if differs:
        raise UsageError(f"{flag}: the recipe differs from the one {run} was started with ({saved}) in "
                         f"{', '.join(sorted(differs))}; a resumed run may only train longer (train.epochs, "
                         f"train.max_steps)")
    return old


def _finished(run: Path, checkpoint: Path) -> bool:
    """Did the run export at the step of its newest checkpoint (a requeued job of a run that is done)?"""
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (run / "export" / "model.safetensors").is_file() and summary.get("steps") == checkpoint_step(checkpoint)


def _plan(cfg: TrainCfg, steps_per_epoch: int) -> int:
    return cfg.max_steps or cfg.epochs * steps_per_epoch


def distill(recipe: Recipe, resume: bool = False, cpu: bool = False, quiet: bool = False,
            auto_resume: bool = False) -> Path:
    """Train a student for `recipe`; returns the run folder (with `export/` when it finished).

    resume: continue from the newest valid checkpoint (damaged ones are moved aside). auto_resume: resume when the run
    folder has a checkpoint, start fresh when it has none. A resumed recipe may raise train.epochs / train.max_steps:
    the lr schedule is then the one the longer plan defines at each step (see README, "Long runs and clusters").
    Stops with `Preempted` after writing a checkpoint on a stop signal or Ctrl-C.
    """
    run = Path(recipe.output_dir)
    flag = "--auto-resume" if auto_resume and not resume else "--resume"
    found = latest_checkpoint(run)
    resume = resume or (auto_resume and found is not None)
    if resume and found is None:
        raise UsageError(f"--resume: no checkpoint in {run / 'checkpoints'}")
    if not resume and found is not None:
        raise UsageError(f"{run} already holds a run; pass --resume to continue it or choose another output_dir")
    old = None
    if resume:
        old = started_with(run, recipe, flag)
        if old is not None and _finished(run, found) and not changed_keys(old, recipe) & LENGTH:
            if not quiet:
                print(f"{run} already finished at step {checkpoint_step(found)}; nothing to do")
            return run
    elif auto_resume and (run / "export").is_dir():  # no checkpoint left, but a finished export
        started_with(run, recipe, flag)

    began = time.perf_counter()
    acc = make_accelerator(recipe, cpu, run)
    s = _set_up(recipe, acc, run, old if resume else None, resume, flag, quiet)
    scored, wall = _train(recipe, s, quiet)
    _finish(recipe, s, scored, wall, began, quiet)
    return run


@dataclass
class Session:
    """A run once set up (`_set_up`): what the training loop and the export work with."""
    acc: Accelerator
    run: Path
    parts: Parts
    model: torch.nn.Module  # parts.model as prepared by Accelerate
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: DataLoader
    state: TrainState
    total: int  # steps of the (possibly extended) plan
    steps_per_epoch: int
    heldout: HeldOut | None
    files: list
    val_files: list
    unreadable: list
    bad: set  # files that failed to decode (cached ones are in the cache's metadata)
    cache_s: float
    resumed: bool


def _set_up(recipe: Recipe, acc: Accelerator, run: Path, old: Recipe | None, resume: bool, flag: str,
            quiet: bool) -> Session:
    """Data, teacher, student, optimizer, target cache and schedule, restored from the newest valid checkpoint when
    resuming; the recipe (and a CLIP text tower) written into the run folder."""
    m, cfg = recipe.model, recipe.train
    say = (lambda *a: None) if quiet else acc.print
    checkpoint = None
    if resume:  # the main process verifies and moves damaged checkpoints aside; then all see the same newest one
        if acc.is_main_process:
            newest_valid(run)
        acc.wait_for_everyone()
        checkpoint = latest_checkpoint(run)
        if checkpoint is None:
            raise UsageError(f"{flag}: no valid checkpoint left in {run / 'checkpoints'} (damaged ones were moved "
                             f"aside, see above); start again without {flag} into another output_dir")
    sources = open_sources(recipe.data, recipe.seed)
    files, val_files, unreadable = sources.train, sources.val, sources.unreadable
    if sources.streaming and recipe.cache.enabled:
        raise UsageError("recipe key cache.enabled: the target cache needs random access (an image folder or a "
                         "Hugging Face dataset); WebDataset shards stream")
    train_precision = "bf16" if acc.mixed_precision == "bf16" else "fp32"
    parts = build_parts(recipe, acc.device, train_precision)
    precision = "bf16 autocast" if acc.mixed_precision == "bf16" else "fp32"
    targets = parts.teacher
    say(unlocked_table(parts.student, parts.groups, parts.notes))
    say(estimate(targets.teacher, parts.student, parts.groups, recipe.views.num, cfg.batch_size,
                 acc.mixed_precision == "bf16", recipe.speed.grad_checkpointing, targets.chunk(acc.device)).line())
    if sources.streaming:
        data = ShardImages(files, sources.shard_counts, m.img_size, parts.mean, parts.std, recipe.seed,
                           recipe.data.resize, targets.plan_fn(), acc.process_index, acc.num_processes,
                           recipe.data.num_workers, cfg.batch_size)
    else:
        data = ImageDataset(files, m.img_size, parts.mean, parts.std, recipe.seed, recipe.data.resize, train=True,
                            make_plan=targets.plan_fn())
    cache_folder = (Path(recipe.cache.dir) if recipe.cache.dir else run / "target_cache") if recipe.cache.enabled \
        else None
    key = cache_key(recipe, files, teacher_precision(recipe.speed, acc.device, train_precision),
                    find_weights(m).file) if cache_folder else None
    space = check_space(_disk_needs(recipe, parts, data, run, cache_folder, key))
    cache_s = time.perf_counter()
    if cache_folder:
        data.cache = TargetCache.open_or_build(cache_folder, key, data, targets, acc, recipe.cache.plans,
                                               recipe.cache.dtype, cfg.batch_size, quiet)
    cache_s = time.perf_counter() - cache_s
    if sources.streaming:
        # Each process already reads only its own shards: Accelerate must not split the stream again, only place
        # batches on the device. Workers restart each epoch so that they see the new epoch's shard order.
        loader = DataLoader(data, cfg.batch_size, collate_fn=collate, num_workers=recipe.data.num_workers,
                            pin_memory=acc.device.type == "cuda")
        loader = prepare_data_loader(loader, acc.device, num_processes=1, process_index=0, put_on_device=True,
                                     non_blocking=True)
        model, optimizer = acc.prepare(parts.model, parts.optimizer)
    else:
        workers = 0 if data.cache else recipe.data.num_workers  # cached batches are memory-map reads: no decoding
        loader = DataLoader(data, cfg.batch_size, sampler=EpochSampler(len(data), recipe.seed), collate_fn=collate,
                            num_workers=workers, persistent_workers=workers > 0,
                            pin_memory=acc.device.type == "cuda")
        model, optimizer, loader = acc.prepare(parts.model, parts.optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total = _plan(cfg, steps_per_epoch)
    state = TrainState()
    heldout = HeldOut.from_files(val_files, targets, recipe, acc.device, recipe.data.val_limit) if val_files else None

    if resume:
        state.load_state_dict(load_checkpoint(acc, checkpoint, model, optimizer)["train"])
        planned = _plan(old.train, steps_per_epoch) if old else total
        if total < max(planned, state.step):
            raise UsageError(f"{flag}: {run} was planned for {planned} steps and is at step {state.step}; a resumed "
                             f"run can train longer (train.epochs, train.max_steps) but not shorter ({total} steps)")
        say(f"resumed from {checkpoint} at step {state.step}" + (f", extended to {total} steps" if total > planned
                                                                else ""))
    if acc.is_main_process:
        with writing("the run's recipe", run / "recipe.yaml"):
            run.mkdir(parents=True, exist_ok=True)
            if not resume:
                (run / "metrics.jsonl").unlink(missing_ok=True)
            else:  # rows logged after the checkpoint (a crash, not a preemption) are logged again from here
                _trim_metrics(run / "metrics.jsonl", state.step)
            save_recipe(recipe, run / "recipe.yaml")
    if acc.is_main_process and m.text_model and not (run / TEXT_FILE).is_file():
        with writing("the CLIP text tower", run / TEXT_FILE):  # it travels with the export, for zero-shot
            load_text_tower(m).save(run / TEXT_FILE)
    # LambdaLR from the step: a fresh run starts at 0; a resumed one continues at its step (with the optimizer's
    # `initial_lr`), on the schedule of `total`, which is longer than the saved one when the run is extended.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lr_factor(cfg, total), last_epoch=state.step - 1)
    if cfg.trackers:
        acc.init_trackers("phreg", config=_tracker_config(recipe),
                          init_kwargs={"wandb": {"name": run.name}, "mlflow": {"run_name": run.name}})
    streamed = f" (streamed from {len(files)} shards)" if sources.streaming else ""
    say(f"{sum(sources.shard_counts) if sources.streaming else len(files)} training images{streamed}, "
        f"{len(val_files)} held out, {len(unreadable)} unreadable; "
        f"{steps_per_epoch} steps/epoch, {total} steps, {acc.num_processes} process(es) on {acc.device}, "
        f"precision {precision}")
    say(f"disk: {space}")

    cache = getattr(data, "cache", None)
    bad: set[str] = set(cache.meta.get("undecodable_files", [])) if cache else set()
    return Session(acc, run, parts, model, optimizer, scheduler, loader, state, total, steps_per_epoch, heldout, files,
                   val_files, unreadable, bad, cache_s, resume)


def _train(recipe: Recipe, s: Session, quiet: bool) -> tuple[dict | None, float]:
    """The loop: steps to the end of the plan, log lines, held-out scores and checkpoints. A stop signal or Ctrl-C
    writes a checkpoint and raises `Preempted`. Returns the latest held-out score and the training time."""
    acc, run, state, cfg = s.acc, s.run, s.state, recipe.train
    model, optimizer, scheduler, loader = s.model, s.optimizer, s.scheduler, s.loader
    targets, heldout, total, steps_per_epoch = s.parts.teacher, s.heldout, s.total, s.steps_per_epoch
    params = s.parts.params  # the unlocked parameters, gathered once
    progress = Progress(acc, run / "metrics.jsonl", total, state.step, quiet)
    scored = None  # the latest held-out score
    saved_step = state.step if s.resumed else None

    def save(stop: StopRequests) -> Path:
        stop.saving = True  # signals now wait until the checkpoint is complete
        try:
            return save_checkpoint(acc, run, state.step, cfg.keep_last, model, optimizer,
                                   dict(train=state.state_dict()))
        finally:
            stop.saving = False
            stop.saved()

    with StopRequests(acc, cfg.stop_signals, cfg.save_every_minutes) as stop:
        while state.step < total:
            epoch, skip = divmod(state.step, steps_per_epoch)
            batches = acc.skip_first_batches(loader, skip * cfg.grad_accum) if skip else loader
            batches.set_epoch(epoch)  # Accelerate's loaders re-set the sampler's epoch from their own counter
            for batch in batches:
                loss, found_inf = train_step(acc, model, targets, optimizer, params, batch, cfg)
                progress.add(loss, len(batch["image"]) * acc.num_processes, found_inf)
                s.bad.update(batch["bad"])
                if found_inf is None:  # accumulating gradients
                    continue
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                state.step += 1
                if state.step % cfg.log_every == 0 or state.step == total:
                    progress.log(state, epoch, lr)
                    if state.nonfinite > cfg.max_nonfinite:
                        raise Aborted(f"{state.nonfinite} steps had a non-finite loss or gradient "
                                      f"(train.max_nonfinite={cfg.max_nonfinite}); lower train.lr or check the data")
                if heldout and cfg.eval_every and state.step % cfg.eval_every == 0:
                    scored = _score_heldout(heldout, s.parts.student, state.step, progress, quiet)
                stopping, due = stop.poll()
                if state.step >= total:
                    break
                if stopping or due or (cfg.save_every and state.step % cfg.save_every == 0):
                    if progress.micro:  # images seen and non-finite steps reach `state` at a log line
                        progress.log(state, epoch, lr)
                    where = save(stop)
                if stopping:
                    progress.close()
                    stop.settle()
                    acc.end_training()
                    raise Preempted(state.step, where, stop.requested)
        if saved_step != state.step:  # not when a finished run was resumed at its last step
            save(stop)
    wall = time.perf_counter() - progress.start
    if heldout and not (scored and scored["step"] == state.step):
        scored = _score_heldout(heldout, s.parts.student, state.step, progress, quiet)
    progress.close()
    return scored, wall


def _finish(recipe: Recipe, s: Session, scored: dict | None, wall: float, began: float, quiet: bool) -> None:
    """The export and `summary.json` (what the model card is made of), written by the main process."""
    acc, run, parts, state, m = s.acc, s.run, s.parts, s.state, recipe.model
    say = (lambda *a: None) if quiet else acc.print
    files, val_files, unreadable, bad, cache_s, model = s.files, s.val_files, s.unreadable, s.bad, s.cache_s, s.model
    if acc.is_main_process:
        export_s = time.perf_counter()
        export_student(acc.unwrap_model(model).model, run / "export", mean=parts.mean, std=parts.std,
                       metadata=export_metadata(recipe, state.step), text_tower=run / TEXT_FILE)
        export_s = time.perf_counter() - export_s
        with writing("the run summary", run / "summary.json"):
            write_json(run / "summary.json", dict(
                phreg_version=__version__, base_model=m.name, recipe_hash=recipe_hash(recipe), steps=state.step,
                images_seen=state.images, wall_s=round(wall, 1), nonfinite_steps=state.nonfinite,
                unreadable_files=[str(p) for p in unreadable], undecodable_files=sorted(bad),
                heldout=scored, hardware=_hardware(acc),
                timings=dict(total_s=round(time.perf_counter() - began, 1), cache_s=round(cache_s, 1),
                             train_s=round(wall, 1), export_s=round(export_s, 1)),
                versions=dict(torch=torch.__version__, timm=timm.__version__),
                weights=find_weights(m).record(m.name),  # what the model card says the student was made from
                registers=dict(present=backbone(parts.teacher.teacher).num_registers,
                               added=m.registers, total=backbone(parts.student).num_registers),
                data=data_record(recipe.data, files, val_files),
                recipe=to_dict(recipe)))
        if unreadable or bad:
            say(f"skipped {len(unreadable) + len(bad)} unreadable image file(s); see {run / 'summary.json'}")
        total_s = time.perf_counter() - began
        say(f"exported {run / 'export'} in {export_s:.1f}s; the run took {total_s:.0f}s: "
            + (f"caching teacher targets {cache_s:.0f}s, " if recipe.cache.enabled else "")
            + f"training {wall:.0f}s, setup and the rest {max(0.0, total_s - cache_s - wall - export_s):.0f}s")
    acc.wait_for_everyone()
    acc.end_training()


def _disk_needs(recipe: Recipe, parts: Parts, data: ImageDataset, run: Path, cache_folder: Path | None,
                key: str | None) -> list[tuple[Path, int, str]]:
    """What the run will still write: keep_last + 1 checkpoints at the peak (the new one lands before the oldest
    goes), the target cache unless it is already complete, and the export."""
    weights = sum(t.numel() * 4 for t in parts.student.state_dict().values())  # float32 in checkpoint and export
    moments = sum(p.numel() * 4 * 2 for p in parts.params)  # AdamW: exp_avg, exp_avg_sq
    checkpoint = weights + moments + (64 << 10)
    count = max(1, recipe.train.keep_last + 1 - len(checkpoint_dirs(run)))
    needs = [(run / "checkpoints", count * checkpoint, f"{count} checkpoint{'s' if count > 1 else ''}"),
             (run / "export", weights, "export")]
    if cache_folder is not None:
        meta = cache_folder / META
        done = meta.is_file() and json.loads(meta.read_text()).get("key") == key
        if not done:
            t = parts.teacher
            needs.append((cache_folder, cache_bytes(len(data), recipe.cache.plans, t.num_patches, t.dim,
                                                    recipe.cache.dtype, data.size, recipe.views.num), "target cache"))
    return needs


def _trim_metrics(path: Path, step: int) -> None:
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


def _tracker_config(recipe: Recipe) -> dict:
    """The recipe as flat scalars (TensorBoard's hparams take no lists or None)."""
    flat = _flat(to_dict(recipe))
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flat.items()}


def _score_heldout(heldout: HeldOut, student, step: int, progress: Progress, quiet: bool) -> dict:
    result = dict(step=step, teacher=heldout.teacher_distance, student=heldout.score(student))
    if not quiet and not progress.bar.disable:  # tqdm.write clears the bar, prints the line, redraws the bar below
        progress.bar.write(f"step {step}: held-out mean 1-cos to denoised targets: teacher {result['teacher']:.4f}  "
                           f"student {result['student']:.4f}")
    progress.write(dict(heldout=result))
    return result


def _hardware(acc: Accelerator) -> dict:
    dev = torch.cuda.get_device_name(acc.device) if acc.device.type == "cuda" else platform.processor() or "cpu"
    return dict(device=str(acc.device), name=dev, processes=acc.num_processes, precision=str(acc.mixed_precision),
                torch_threads=torch.get_num_threads())
