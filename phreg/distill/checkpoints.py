"""Checkpoints of a run: `RUN/checkpoints/step_N/`, written whole or not at all, verified before use.

A checkpoint holds only safetensors and JSON, so a run folder from someone else can be resumed or exported without
unpickling anything (Accelerate's `save_state` writes pickles: `optimizer.bin`, `random_states_*.pkl`,
`custom_checkpoint_*.pkl`). Files:

    model.safetensors      the student (keys `model.*`, as `phreg export` and the tests read them)
    optimizer.safetensors  the optimizer's per-parameter state (AdamW: step, exp_avg, exp_avg_sq)
    state.json             optimizer hyper-parameters, lr schedule, step counters
    rng_R.json             random generator states of process R (python, numpy, torch CPU and CUDA)
    manifest.json          size and sha256 of every file above; written last

Each checkpoint is written into `.step_N.tmp/` and renamed when complete, so a folder named `step_N` always had a
complete manifest; a file damaged later (truncated copy, bad disk) fails its size or hash. `--resume` uses the newest
checkpoint that verifies, and moves damaged ones aside (`step_N.damaged-TIME`), never deleting them.
Kept apart from the loop so that export (and anything else that reads a run) can find checkpoints without importing
the training code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from ..errors import UsageError
from .disk import writing

MODEL, OPTIMIZER, STATE, MANIFEST = "model.safetensors", "optimizer.safetensors", "state.json", "manifest.json"
FORMAT = "phreg.checkpoint/1"
STEP_DIR = re.compile(r"^step_(\d+)$")
RNG_FILE = re.compile(r"^rng_\d+\.json$")


def checkpoint_dirs(run: Path) -> list[Path]:
    """`RUN/checkpoints/step_N` folders, oldest first (temporary and moved-aside folders are not checkpoints)."""
    folder = Path(run) / "checkpoints"
    found = [p for p in folder.iterdir() if STEP_DIR.match(p.name) and p.is_dir()] if folder.is_dir() else []
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(STEP_DIR.match(Path(path).name).group(1))


def latest_checkpoint(run: Path) -> Path | None:
    """The newest checkpoint folder, verified or not (is there a run here at all?)."""
    found = checkpoint_dirs(run)
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------------- verify

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def damage(folder: Path) -> str | None:
    """Why `folder` is not a usable checkpoint, or None when every file has the size and sha256 its manifest says.

    Anything besides the files phreg writes is refused too: phreg never unpickles, so a `.pkl` or `.bin` here was
    not written by it (an older Accelerate-format checkpoint, or a planted file)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        assert manifest["format"] == FORMAT and isinstance(files, dict)
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
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST}"
    if not {MODEL, OPTIMIZER, STATE} <= set(files):
        return f"{MANIFEST} lists no {MODEL}, {OPTIMIZER} or {STATE}"
    return None


def newest_valid(run: Path, move_aside: bool = True, say=None) -> Path | None:
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


# ------------------------------------------------------------------------------------------------------------ write

def _write(path: Path, data: bytes, what: str) -> dict:
    """Write and fsync one file; returns its manifest entry."""
    with writing(what, path):
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return dict(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, allow_nan=True) + "\n").encode()  # floats round-trip exactly through repr


def rng_state() -> dict:
    """Every global random generator a step could draw from (phreg's own draws are keyed by seed, epoch, index)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    b64 = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    return dict(python=[version, list(mt), gauss], numpy=[name, keys.tolist(), pos, has_gauss, cached],
                torch=b64(torch.get_rng_state()),
                cuda=[b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [])


def set_rng_state(d: dict) -> None:
    unb64 = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    version, mt, gauss = d["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = d["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(unb64(d["torch"]))
    if d["cuda"] and torch.cuda.is_available() and len(d["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([unb64(s) for s in d["cuda"]])


def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors for safetensors, the rest for JSON)."""
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, dict(scalars=scalars, param_groups=sd["param_groups"])


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict, current: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = []
    for saved, now in zip(meta["param_groups"], current["param_groups"]):  # JSON made tuples (betas) lists
        groups.append({k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in saved.items()})
    return dict(state=state, param_groups=groups)


def save_checkpoint(acc, run: Path, step: int, keep_last: int, model, optimizer, state: dict) -> Path:
    """Write `RUN/checkpoints/step_N` whole (temporary folder, manifest last, rename), then keep the newest
    `keep_last`. `state`: JSON-able counters and schedule of the loop. Every process calls this."""
    folder = Path(run) / "checkpoints"
    final, tmp = folder / f"step_{step:08d}", folder / f".step_{step:08d}.tmp"
    what = f"checkpoint step {step}"
    if acc.is_main_process:
        with writing(what, folder):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    try:
        _write(tmp / f"rng_{acc.process_index}.json", _json_bytes(rng_state()), what)
        acc.wait_for_everyone()
        if acc.is_main_process:
            files = {}
            weights = {k: v.detach().cpu().contiguous() for k, v in acc.unwrap_model(model).state_dict().items()}
            files[MODEL] = _write(tmp / MODEL, safetensors.torch.save(weights, {"format": "pt"}), what)
            tensors, meta = _split_optimizer(optimizer.state_dict())
            files[OPTIMIZER] = _write(tmp / OPTIMIZER, safetensors.torch.save(tensors), what)
            files[STATE] = _write(tmp / STATE, _json_bytes(dict(state, optimizer=meta)), what)
            for path in sorted(tmp.glob("rng_*.json")):
                files[path.name] = dict(bytes=path.stat().st_size, sha256=_sha256(path))
            _write(tmp / MANIFEST, _json_bytes(dict(format=FORMAT, step=step, files=files)), what)
            with writing(what, final):
                if final.exists():  # the same step written again (a finished run resumed): replace it whole
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(folder)
            for old in checkpoint_dirs(run)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    acc.wait_for_everyone()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------------------- load

def load_checkpoint(acc, folder: Path, model, optimizer) -> dict:
    """Restore model, optimizer and this process's random generators from a verified checkpoint; returns the loop's
    state (what `save_checkpoint` was given). Only safetensors and JSON are read."""
    try:
        weights = safetensors.torch.load_file(str(folder / MODEL))
        acc.unwrap_model(model).load_state_dict(weights)
        saved = json.loads((folder / STATE).read_text())
        tensors = safetensors.torch.load_file(str(folder / OPTIMIZER))
        optimizer.load_state_dict(_join_optimizer(tensors, saved.pop("optimizer"), optimizer.state_dict()))
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(f"checkpoint {folder} does not fit this recipe: {str(e).splitlines()[0]}") from None
    rng = folder / f"rng_{acc.process_index}.json"
    if rng.is_file():  # absent when resuming with more processes than the run had: their draws restart
        set_rng_state(json.loads(rng.read_text()))
    return saved
