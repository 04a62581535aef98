"""A run set up to train: data, teacher and student, the target cache, the loader, and the state it resumes from.

`set_up` reads as the list of what a run needs, in order; each builder below does one of them. Everything here
happens before the first step, so every mistake it can find is found before any training time is spent.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from ..clip.text import load_text_tower
from ..config.recipe import Recipe, save_recipe
from ..data.images import EpochSampler, ImageDataset, collate
from ..data.scan import embedded_photos, kind
from ..data.sources import ShardImages, open_sources
from ..errors import UsageError
from ..files.atomic import write_atomic, writing
from ..hub.export import export_bytes, export_dtype
from ..models.weights import base_change, find_weights
from ..run import training_list
from ..run.folder import METRICS, RECIPE, TEXT_FILE, cache_folder, checkpoint_dirs, checkpoint_step
from ..targets.cache import META, TargetCache, cache_bytes, cache_key
from ..targets.heldout import HeldOut
from .checkpoints import load_checkpoint, saved_state
from .disk import check_space
from .memory import estimate, resident_bytes, return_freed_memory
from .preempt import StopRequests
from .progress import TrainState, tracker_config
from .resume import Start, planned_steps, trim_metrics
from .speed import teacher_precision
from .step import Parts, build_parts, lr_factor
from .unlock import UNLOCKED_FILE, unlocked_summary, unlocked_table


@dataclass(kw_only=True)
class Session:
    """A run once set up: what the training loop and the export work with."""
    acc: Accelerator
    run: Path
    parts: Parts
    student_tokens: torch.nn.Module  # parts.student_tokens as prepared by Accelerate (DDP, autocast, compile)
    optimizer: torch.optim.Optimizer  # parts.optimizer as prepared by Accelerate
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
    base: dict  # the frozen base weights' identity (`Weights.identity`): in every checkpoint and in summary.json


def set_up(recipe: Recipe, acc: Accelerator, run: Path, start: Start, quiet: bool, verbose: bool = False) -> Session:
    """Data, teacher, student, optimizer, target cache and schedule, restored from the newest valid checkpoint when
    resuming; the recipe, the unlocked-parameter table (printed whole with `verbose`, else in one line) and a CLIP
    text tower written into the run folder."""
    say = (lambda *a: None) if quiet else acc.print
    checkpoint = start.checkpoint(acc, run) if start.resume else None
    base = base_weights(recipe, checkpoint, start.flag)
    sources = open_sources(recipe.data, recipe.seed)
    if sources.streaming and recipe.cache.enabled:
        raise UsageError("recipe key cache.enabled: the target cache needs random access (an image folder or a "
                         "Hugging Face dataset); WebDataset shards stream")
    train_precision = "bf16" if acc.mixed_precision == "bf16" else "fp32"
    if recipe.speed.frozen_dtype == "bf16" and train_precision != "bf16":
        raise UsageError("recipe key speed.frozen_dtype: bf16 frozen weights need bf16 autocast, and this run trains "
                         "in fp32 (a CPU: set train.precision=bf16)")
    if acc.device.type == "cpu":  # activations live in host memory: freed ones go back to the OS, not into holes
        return_freed_memory()
    runtime = resident_bytes() if acc.device.type == "cpu" else 0  # what the process holds before the model
    parts = build_parts(recipe, acc.device, train_precision, [] if sources.streaming else sources.train)
    if parts.teacher_ttr is not None:
        t = parts.teacher_ttr
        say(f"targets read with test-time registers ({recipe.model.teacher_ttr}): {t['count']} register neurons "
            f"{t['neurons']}" if t["count"] else
            f"model.teacher_ttr={recipe.model.teacher_ttr}: no register neurons, so the targets are the plain teacher's")
    table = unlocked_table(parts.student, parts.groups, parts.notes)
    say(table if verbose else unlocked_summary(parts.student, parts.groups, parts.notes, run / UNLOCKED_FILE))
    say(estimate(parts.targets.teacher, parts.student, parts.groups, recipe.views.num, recipe.train.batch_size,
                 acc.mixed_precision == "bf16", recipe.speed.grad_checkpointing,
                 parts.targets.chunk(acc.device), runtime).line())
    data = training_images(recipe, acc, sources, parts.targets.plan_fn(), parts.mean, parts.std)
    student_tokens, optimizer, loader = prepare(recipe, acc, parts, data, sources.streaming)
    steps_per_epoch = math.ceil(len(loader) / recipe.train.grad_accum)
    total = planned_steps(recipe.train, steps_per_epoch)
    first = checkpoint_step(checkpoint) // steps_per_epoch if checkpoint else 0
    epochs = range(first, math.ceil(total / steps_per_epoch))
    space, cache_s = fill_cache(recipe, acc, run, parts, data, sources.train, train_precision, quiet, epochs)
    state = TrainState()
    heldout = HeldOut.from_files(sources.val, parts.targets, recipe, acc.device, recipe.data.val_limit) \
        if sources.val else None
    if checkpoint is not None:
        state.load_state_dict(load_checkpoint(acc, checkpoint, student_tokens, optimizer)["train"])
        planned = start.check_length(run, state.step, total, steps_per_epoch)
        say(f"resumed from {checkpoint} at step {state.step}" + (f", extended to {total} steps" if total > planned
                                                                else ""))
    write_run_files(recipe, acc, run, start.resume, state.step)
    if acc.is_main_process:
        with writing("the unlocked-parameter table", run / UNLOCKED_FILE):
            write_atomic(run / UNLOCKED_FILE, table + "\n")
        if kind(recipe.data.root) == "folder" and not (start.resume and (run / training_list.RECORD).is_file()):
            with writing("the training list", run / training_list.RECORD):  # what eval checks its images against
                root = Path(recipe.data.root).expanduser() if recipe.data.root else embedded_photos()
                training_list.write_record(run, sources.train, root)
    # LambdaLR from the step: a fresh run starts at 0; a resumed one continues at its step (with the optimizer's
    # `initial_lr`), on the schedule of `total`, which is longer than the saved one when the run is extended.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lr_factor(recipe.train, total),
                                                  last_epoch=state.step - 1)
    if recipe.train.trackers:
        acc.init_trackers("phreg", config=tracker_config(recipe),
                          init_kwargs={"wandb": {"name": run.name}, "mlflow": {"run_name": run.name}})
    files, precision = sources.train, "bf16 autocast" if acc.mixed_precision == "bf16" else "fp32"
    streamed = f" (streamed from {len(files)} shards)" if sources.streaming else ""
    say(f"{sum(sources.shard_counts) if sources.streaming else len(files)} training images{streamed}, "
        f"{len(sources.val)} held out, {len(sources.unreadable)} unreadable; "
        f"{steps_per_epoch} steps/epoch, {total} steps, {acc.num_processes} process(es) on {acc.device}, "
        f"precision {precision}")
    say(f"disk: {space}")
    if not sources.streaming and (note := clipped_batch(len(files), recipe.train.batch_size, acc.num_processes)):
        acc.print(note)  # said even with --quiet: the batch is not what the recipe asks for
    cache = getattr(data, "cache", None)
    return Session(acc=acc, run=run, parts=parts, student_tokens=student_tokens, optimizer=optimizer,
                   scheduler=scheduler, loader=loader, state=state, total=total, steps_per_epoch=steps_per_epoch,
                   heldout=heldout, files=files, val_files=sources.val, unreadable=sources.unreadable,
                   bad=set(cache.meta.get("undecodable_files", [])) if cache else set(), cache_s=cache_s,
                   resumed=start.resume, base=base)


def base_weights(recipe: Recipe, checkpoint: Path | None, flag: str) -> dict:
    """The identity of the weights the student's frozen tensors come from (hashed once per run); when resuming, the
    same as the checkpoint's, or a one-line refusal: a checkpoint holds only what trains."""
    recorded = saved_state(checkpoint).get("base") if checkpoint is not None else None
    now = find_weights(recipe.model).identity(recipe.model.name, recorded)
    why = base_change(recorded, now) if recorded else None
    if why:
        raise UsageError(f"{flag}: the base weights of {recipe.model.name} changed since {checkpoint} was written "
                         f"({why}); its frozen tensors are those weights, so resume with the file it was trained on")
    return now


def training_images(recipe: Recipe, acc: Accelerator, sources, make_plan, mean, std):
    """The training set: seeded crops and view plans (`make_plan(rng=...)`) per image and epoch (folders, datasets),
    or a shard stream."""
    m = recipe.model
    if sources.streaming:
        return ShardImages(sources.train, sources.shard_counts, m.img_size, mean, std, recipe.seed, recipe.data.resize,
                           make_plan, acc.process_index, acc.num_processes, recipe.data.num_workers,
                           recipe.train.batch_size, held=sources.held)
    return ImageDataset(sources.train, m.img_size, mean, std, recipe.seed, recipe.data.resize, train=True,
                        make_plan=make_plan)


def fill_cache(recipe: Recipe, acc: Accelerator, run: Path, parts: Parts, data, files: list,
               train_precision: str, quiet: bool, epochs: range) -> tuple[str, float]:
    """Check the disk for everything the run will write, then open the target cache when enabled, computing the
    variants that `epochs` train on (epoch e: variant e mod cache.plans) that it does not hold yet. A stop signal or
    Ctrl-C stops the build after the batch in hand, keeping what is computed. Returns the disk line and the seconds
    spent on the cache."""
    folder = cache_folder(recipe, run) if recipe.cache.enabled else None
    key = cache_key(recipe, files, teacher_precision(recipe.speed, acc.device, train_precision),
                    find_weights(recipe.model).file) if folder else None
    space = check_space(disk_needs(recipe, parts, data, run, folder, key))
    began = time.perf_counter()
    if folder:
        c = recipe.cache
        variants = sorted({e % c.plans for e in epochs[:c.plans]})
        with StopRequests(acc, recipe.train.stop_signals, 0, stopping="stopping after this batch of teacher "
                          "targets (the finished ones are kept)", quitting="Ctrl-C again to quit at once") as stop:
            data.cache = TargetCache.open_or_build(folder, key, data, parts.targets, acc, c.plans, c.dtype,
                                                   recipe.train.batch_size, quiet, recipe.data.num_workers, variants,
                                                   stop)
    return space, time.perf_counter() - began


def prepare(recipe: Recipe, acc: Accelerator, parts: Parts, data, streaming: bool):
    """The loader, and the student and optimizer as Accelerate wraps them."""
    student_tokens, optimizer = acc.prepare(parts.student_tokens, parts.optimizer)
    return student_tokens, optimizer, training_loader(recipe, acc, data, streaming)


def training_loader(recipe: Recipe, acc: Accelerator, data, streaming: bool = False):
    """The batches the step receives, as Accelerate hands them over: on the device, each process its own share.

    Data workers decode and crop (uint8; the device normalizes), or read whole batches from the target cache; on a GPU
    batches are pinned and copied without blocking. `benchmarks/bench_loader.py` times exactly this loader."""
    cfg, pin, workers = recipe.train, acc.device.type == "cuda", recipe.data.num_workers
    if streaming:
        # Each process already reads only its own shards: Accelerate must not split the stream again, only place
        # batches on the device. Workers restart each epoch so that they see the new epoch's shard order.
        loader = DataLoader(data, cfg.batch_size, collate_fn=collate, num_workers=workers, pin_memory=pin)
        return prepare_data_loader(loader, acc.device, num_processes=1, process_index=0, put_on_device=True,
                                   non_blocking=True)
    loader = DataLoader(data, cfg.batch_size, sampler=EpochSampler(len(data), recipe.seed), collate_fn=collate,
                        num_workers=workers, persistent_workers=workers > 0, pin_memory=pin,
                        drop_last=drop_partial_batch(len(data), cfg.batch_size, acc.num_processes))
    return acc.prepare_data_loader(loader)


def drop_partial_batch(images: int, batch_size: int, processes: int) -> bool:
    """Training drops an epoch's partial last batch (as timm's training loader does), so every step has the same
    shape: a compiled teacher and student then never recompile (a recompile at each epoch's end stalls a GPU run for
    tens of seconds), and no step weighs a handful of images like a whole batch. The epoch order is reshuffled, so no
    image is left out for long (Flickr30k at batch 8: 7 of 31,783 per epoch). Marking the batch dimension dynamic
    would keep the partial batch at the price of shape-generic kernels and no CUDA graphs; padding it would need a
    masked loss. A set smaller than one batch on every process keeps its single, always equal, batch."""
    return images >= batch_size * processes


def clipped_batch(images: int, batch_size: int, processes: int) -> str | None:
    """The line that says a batch larger than the training set is clipped to it (`drop_partial_batch` keeps a set
    smaller than one batch as its single batch: every step trains on all of it); None when the batch fits."""
    if images >= batch_size * processes:
        return None
    asked = f"train.batch_size={batch_size}" + (f" x {processes} processes" if processes > 1 else "")
    return (f"{asked} is more than the {images} training image{'s' * (images != 1)}: the batch is clipped to them, "
            f"every step trains on all {images}")


def write_run_files(recipe: Recipe, acc: Accelerator, run: Path, resume: bool, step: int) -> None:
    """The resolved recipe, a fresh (or trimmed, when resuming) metrics.jsonl and a CLIP run's text tower, which
    travels with the export for zero-shot use. The main process writes."""
    if not acc.is_main_process:
        return
    with writing("the run's recipe", run / RECIPE):
        run.mkdir(parents=True, exist_ok=True)
        if not resume:
            (run / METRICS).unlink(missing_ok=True)
        else:  # rows logged after the checkpoint (a crash, not a preemption) are logged again from here
            trim_metrics(run / METRICS, step)
        save_recipe(recipe, run / RECIPE)
    if recipe.model.text_model and not (run / TEXT_FILE).is_file():
        with writing("the CLIP text tower", run / TEXT_FILE):
            load_text_tower(recipe.model).save(run / TEXT_FILE)


def disk_needs(recipe: Recipe, parts: Parts, data: ImageDataset, run: Path, cache_folder: Path | None,
               key: str | None) -> list[tuple[Path, int, str]]:
    """What the run will still write: keep_last + 1 checkpoints at the peak (the new one lands before the oldest
    goes; each holds what trains), the target cache unless it is already complete, and the export."""
    weights = export_bytes(parts.student, export_dtype(recipe))
    trained = sum(p.numel() * p.element_size() * 3 for p in parts.params)  # a checkpoint: them + AdamW's 2 moments
    checkpoint = trained + (64 << 10)
    count = max(1, recipe.train.keep_last + 1 - len(checkpoint_dirs(run)))
    needs = [(run / "checkpoints", count * checkpoint, f"{count} checkpoint{'s' if count > 1 else ''}"),
             (run / "export", weights, "export")]
    if cache_folder is not None:
        meta = cache_folder / META
        done = meta.is_file() and json.loads(meta.read_text()).get("key") == key
        if not done:
            t = parts.targets
            needs.append((cache_folder, cache_bytes(len(data), recipe.cache.plans, t.num_patches, t.dim,
                                                    recipe.cache.dtype, data.size, recipe.views.num), "target cache"))
    return needs
