"""Checkpoints of a run: `RUN/checkpoints/step_N/`, written whole or not at all, verified before use.

A checkpoint holds what trains, and only safetensors and JSON, so a run folder from someone else can be resumed or
exported without unpickling anything (Accelerate's `save_state` writes pickles: `optimizer.bin`,
`random_states_*.pkl`, `custom_checkpoint_*.pkl`). Everything frozen is the base model's own weights, rebuilt from
them exactly as at the start (the student is a deterministic function of base weights, recipe and seed), so a
checkpoint of a ViT-L that unlocks 4% of it is 4% of its size. Files:

    model.safetensors      the student's unlocked tensors (keys `model.*`, the names of its state dict)
    optimizer.safetensors  the optimizer's per-parameter state (AdamW: step, exp_avg, exp_avg_sq)
    state.json             optimizer hyper-parameters, lr schedule, step counters, and `base`: the identity of the
                           frozen base weights (file bytes + sha256, or hub id + revision), checked on --resume
    rng_R.json             random generator states of process R (python, numpy, torch CPU and CUDA)
    manifest.json          size and sha256 of every file above; written last

Each checkpoint is written into `.step_N.tmp/` and renamed when complete, so a folder named `step_N` always had a
complete manifest; a file damaged later (truncated copy, bad disk) fails its size or hash. `--resume` uses the newest
checkpoint that verifies, and moves damaged ones aside (`step_N.damaged-TIME`), never deleting them. Finding and
verifying checkpoints is torch-free and lives with the rest of the run folder's layout (`phreg.run`); this module
writes and loads their tensors, straight from and into their storage (`phreg.files.tensorfile`: no copy of the state dict
on the way to disk). Checkpoints of the first format (`phreg.checkpoint/1`: the whole student) still resume and
export.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from ..files.atomic import sha256_file, writing
from ..files.tensorfile import load_file, save_file
from ..run.folder import CHECKPOINT_FORMAT, MANIFEST, MODEL, OPTIMIZER, STATE, checkpoint_dirs


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


def trained_tensors(model) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of the student: its tensors that train, in place (no copy), by their state-dict names
    (a compiled model's `_orig_mod.` left out: the same names with and without `speed.compile`)."""
    return {name.replace("_orig_mod.", ""): p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors for safetensors, the rest for JSON)."""
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach()
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
    `keep_last`. `state`: JSON-able counters and schedule of the loop, and `base` (the base weights' identity). Every
    process calls this. Tensors go to disk from their own storage (GPU ones staged through the host in chunks)."""
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
            with writing(what, tmp):
                files[MODEL] = save_file(trained_tensors(acc.unwrap_model(model)), tmp / MODEL, {"format": "pt"})
                tensors, meta = _split_optimizer(optimizer.state_dict())
                files[OPTIMIZER] = save_file(tensors, tmp / OPTIMIZER)
            files[STATE] = _write(tmp / STATE, _json_bytes(dict(state, optimizer=meta)), what)
            for path in sorted(tmp.glob("rng_*.json")):
                files[path.name] = dict(bytes=path.stat().st_size, sha256=sha256_file(path))
            _write(tmp / MANIFEST, _json_bytes(dict(format=CHECKPOINT_FORMAT, step=step, files=files)), what)
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

def saved_state(folder: Path) -> dict:
    """A checkpoint's state.json (the loop's counters, the optimizer's scalars, the base weights' identity)."""
    return json.loads((Path(folder) / STATE).read_text())


def load_trained(model, folder: Path) -> None:
    """Copy a checkpoint's trained tensors into `model` (whose frozen rest is the base model); a checkpoint that does
    not hold exactly the tensors that train here (another unlock, another architecture) is refused in one line."""
    trained = trained_tensors(model)
    saved = load_file(folder / MODEL, names=list(trained))
    missing = [k for k in trained if k not in saved]
    misfit = [k for k in saved if saved[k].shape != trained[k].shape]
    if missing or misfit:
        what = f"lacks {missing[0]}" if missing else f"has {misfit[0]} of shape {tuple(saved[misfit[0]].shape)}"
        raise UsageError(f"checkpoint {folder} does not fit this recipe: it {what} "
                         f"({len(missing) + len(misfit)} of the {len(trained)} tensors that train)")
    with torch.no_grad():
        for k, t in trained.items():
            t.copy_(saved[k])


def load_checkpoint(acc, folder: Path, model, optimizer) -> dict:
    """Restore the trained tensors, optimizer and this process's random generators from a verified checkpoint;
    returns the loop's state (what `save_checkpoint` was given). Only safetensors and JSON are read."""
    load_trained(acc.unwrap_model(model), folder)
    try:
        saved = saved_state(folder)
        tensors = load_file(folder / OPTIMIZER)
        optimizer.load_state_dict(_join_optimizer(tensors, saved.pop("optimizer"), optimizer.state_dict()))
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(f"checkpoint {folder} does not fit this recipe: {str(e).splitlines()[0]}") from None
    rng = folder / f"rng_{acc.process_index}.json"
    if rng.is_file():  # absent when resuming with more processes than the run had: their draws restart
        set_rng_state(json.loads(rng.read_text()))
    return saved
