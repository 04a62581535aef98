"""A run folder: its layout, and every question about it that distill, export, push and eval ask.

    RUN/recipe.yaml            the resolved recipe the run was started with
    RUN/metrics.jsonl          one JSON line per logged step (and held-out scores)
    RUN/checkpoints/step_N/    verified checkpoints (`phreg.distill.checkpoints` writes and loads them)
    RUN/summary.json           what the run did, written when it finishes (the model card is made of it)
    RUN/export/                the student in timm's Hugging Face layout (`phreg.hub.export`)
    RUN/target_cache/          teacher targets, when cache.enabled (`phreg.targets.cache`; or cache.dir)
    RUN/eval/                  `phreg eval`'s report, when there is one

Torch-free on purpose: a command can check a run folder (is it one, which checkpoint is the newest valid one, did it
finish) in milliseconds, before torch is imported, and `hub/` can read a run without importing the training code.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import time
from pathlib import Path

from ..errors import UsageError
from ..files.atomic import sha256_file
from .lock import holder, refused

RECIPE, METRICS, SUMMARY = "recipe.yaml", "metrics.jsonl", "summary.json"
CHECKPOINTS, EXPORT, EVAL = "checkpoints", "export", "eval"
WEIGHTS, CONFIG = "model.safetensors", "config.json"  # the export: timm's Hugging Face layout
TEXT_FILE = "open_clip_text.safetensors"  # CLIP runs: the text tower, shipped beside the image tower
CACHE, CACHE_META = "target_cache", "meta.json"  # RUN/target_cache/ unless cache.dir names another folder

# A checkpoint folder: RUN/checkpoints/step_N/ with these files, the manifest written last.
MODEL, OPTIMIZER, STATE, MANIFEST = "model.safetensors", "optimizer.safetensors", "state.json", "manifest.json"
CHECKPOINT_FORMAT = "phreg.checkpoint/2"  # what trains + the base weights' identity (/1: the whole student)
CHECKPOINT_FORMATS = ("phreg.checkpoint/1", CHECKPOINT_FORMAT)
STEP_DIR = re.compile(r"^step_(\d+)$")
RNG_FILE = re.compile(r"^rng_\d+\.json$")


def is_run(path: str | Path) -> bool:
    return (Path(path) / RECIPE).is_file()


def require_run(path: str | Path) -> Path:
    """The folder as a run, or the one-line usage error every command gives for a folder that is not one."""
    path = Path(path)
    if not is_run(path):
        if path.is_dir():
            info = holder(path)  # a run in its first seconds holds its folder before it writes recipe.yaml
            if info is not None:
                raise refused(path, info, f"it is starting and has written no {RECIPE} or checkpoint yet: try again "
                                          "once it has saved a checkpoint")
        raise UsageError(f"{path} is not a phreg run folder ({'no ' + RECIPE if path.is_dir() else 'not found'})")
    return path


# ----------------------------------------------------------------------------------------------------- checkpoints

def checkpoint_dirs(run: str | Path) -> list[Path]:
    """`RUN/checkpoints/step_N` folders, oldest first (temporary and moved-aside folders are not checkpoints)."""
    folder = Path(run) / CHECKPOINTS
    found = [p for p in folder.iterdir() if STEP_DIR.match(p.name) and p.is_dir()] if folder.is_dir() else []
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: str | Path) -> int:
    return int(STEP_DIR.match(Path(path).name).group(1))


def latest_checkpoint(run: str | Path) -> Path | None:
    """The newest checkpoint folder, verified or not (is there a run here at all?)."""
    found = checkpoint_dirs(run)
    return found[-1] if found else None


def damage(folder: Path) -> str | None:
    """Why `folder` is not a usable checkpoint, or None when every file has the size and sha256 its manifest says.

    Anything besides the files phreg writes is refused too: phreg never unpickles, so a `.pkl` or `.bin` here was
    not written by it (an older Accelerate-format checkpoint, or a planted file)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        assert manifest["format"] in CHECKPOINT_FORMATS and isinstance(files, dict)
        assert all(isinstance(w, dict) and isinstance(w.get("bytes"), int) and isinstance(w.get("sha256"), str)
                   for w in files.values())
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (ValueError, KeyError, TypeError, AssertionError):
        return f"{MANIFEST} is not a phreg checkpoint manifest"
    allowed = {MODEL, OPTIMIZER, STATE}
    for name in sorted(p.name for p in folder.iterdir() if p.name != MANIFEST):
        if name not in files or not (name in allowed or RNG_FILE.match(name)):
            return f"holds {name}, which phreg never writes nor unpickles"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {want['bytes']}"
        if sha256_file(path) != want["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST}"
    if not {MODEL, OPTIMIZER, STATE} <= set(files):
        return f"{MANIFEST} lists no {MODEL}, {OPTIMIZER} or {STATE}"
    return None


def newest_valid(run: str | Path, move_aside: bool = True, say=None) -> Path | None:
    """The newest checkpoint that verifies. Each damaged one newer than it is reported in one line and, with
    `move_aside`, renamed to `step_N.damaged-TIME` (kept for inspection, out of the way of the next --resume)."""
    say = say or (lambda line: print(line, file=sys.stderr))
    for folder in reversed(checkpoint_dirs(run)):
        why = damage(folder)
        if why is None:
            return folder
        if move_aside:
            aside = folder.with_name(f"{folder.name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            os.replace(folder, aside)
            say(f"phreg: warning: checkpoint {folder} is damaged ({why}); moved aside to {aside.name}")
        else:
            say(f"phreg: warning: checkpoint {folder} is damaged ({why}); skipped")
    return None


def used_folder(run: str | Path) -> UsageError:
    """The refusal of a fresh run into a folder that holds one: a stopped run is continued with --resume; a finished
    one is said to be finished, with how to train it longer (never a bare --resume, which would do nothing)."""
    run = Path(run)
    if finished(run):
        step = read_summary(run)["steps"]
        return UsageError(f"{run} already holds a finished run (step {step}, export written); to train it longer "
                          "pass --resume with a larger train.max_steps or train.epochs, or choose another output_dir")
    return UsageError(f"{run} already holds a run; pass --resume to continue it or choose another output_dir")


# ----------------------------------------------------------------------------------------------- summary, export

def read_summary(run: str | Path) -> dict | None:
    """summary.json as a dict, or None when the run has none (not finished) or it is unreadable."""
    try:
        summary = json.loads((Path(run) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (8-byte length, then JSON), read without torch; {} when the
    file has none. Raises OSError / ValueError for a file that is not safetensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 << 20:
            raise ValueError(f"{path} is not a safetensors file (header of {n} bytes)")
        header = json.loads(f.read(n))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def export_step(run: str | Path) -> int | None:
    """The training step the run's export was written at (its weights' metadata), or None without an export."""
    try:
        steps = safetensors_metadata(Path(run) / EXPORT / WEIGHTS).get("steps")
        return int(steps) if steps is not None else None
    except (OSError, ValueError, struct.error):
        return None


def finished(run: str | Path) -> bool:
    """Did the run finish: its summary.json, its export and its newest checkpoint are of the same step.

    A stopped run has no summary (or an older one, when it was extended); `phreg export` of a stopped run writes an
    export whose step no summary vouches for; a run resumed to train longer has a newer checkpoint than its summary.
    """
    summary = read_summary(run)
    step = summary.get("steps") if summary else None
    if not isinstance(step, int) or export_step(run) != step:
        return False
    newest = latest_checkpoint(run)
    return newest is None or checkpoint_step(newest) == step


# ---------------------------------------------------------------------------------------------------- target cache

def cache_folder(recipe, run: str | Path) -> Path:
    """Where a run's target cache lives: `cache.dir`, else RUN/target_cache."""
    return Path(recipe.cache.dir).expanduser() if recipe.cache.dir else Path(run) / CACHE


def cache_build_unfinished(folder: str | Path) -> bool:
    """A target cache whose build stopped in the middle of a variant (a stop signal, Ctrl-C, a crash): what
    `--resume` continues when the run has no checkpoint yet."""
    try:
        meta = json.loads((Path(folder) / CACHE_META).read_text())
    except (OSError, ValueError):
        return False
    return bool(set(meta.get("started", [])) - set(meta.get("complete", [])))
