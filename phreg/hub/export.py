"""Export: `model.safetensors` + `config.json` in timm's Hugging Face layout.

`timm.create_model('local-dir:RUN/export', pretrained=True)` rebuilds the student, registers included, without phreg.
The folder is written whole or not at all (see `files.atomic_dir`); the weights go to disk straight from the student's
tensors (`phreg.files.tensorfile`: in the export's dtype, converted in bounded chunks where they are not, no copy of the
state dict), with sorted header metadata, so the same student and dtype always export to the same bytes.

The dtype (`export.dtype`, `phreg export --dtype`): fp32, bf16 or fp16 for every floating tensor; `auto` is the dtype
the run held its frozen weights in (`speed.frozen_dtype`), so a bf16 run ships bf16 and every other run fp32. The
safetensors header and config.json name it (`dtype`: `float32`, `bfloat16`, `float16`; a top-level key of config.json,
which timm does not read). timm builds the model in float32 and copies the weights into it (exact from bf16 and fp16);
`model.to(torch.bfloat16)` keeps them in half the memory.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors

from .. import __version__
from ..errors import UsageError
from ..files.atomic import atomic_dir, replaceable, writing
from ..run.folder import (CONFIG, EXPORT, MANIFEST, MODEL, RECIPE, STATE, TEXT_FILE, WEIGHTS, checkpoint_step,
                          newest_valid, require_run)

if TYPE_CHECKING:  # torch and timm are imported where they are used: `phreg export RUN` checks RUN first
    import torch
    from timm.models.vision_transformer import VisionTransformer

TORCH_NAMES = dict(fp32="float32", bf16="bfloat16", fp16="float16")  # as torch, the header and config.json say them


def export_dtype(recipe, choice: str | None = None) -> torch.dtype:
    """The dtype a run's export is written in: `choice` (`--dtype`), else the recipe's `export.dtype`; `auto` is the
    dtype its frozen weights were held in (`speed.frozen_dtype`: fp32 or bf16)."""
    import torch

    name = choice or recipe.export.dtype
    name = recipe.speed.frozen_dtype if name == "auto" else name
    return getattr(torch, TORCH_NAMES[name])


def export_bytes(student, dtype: torch.dtype) -> int:
    """The size of the export's weights (model.safetensors less its header of a few KB) when written in `dtype`:
    what to reserve on disk for it."""
    return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
               for t in student.state_dict().values())


def check_range(tensors: dict, dtype: torch.dtype) -> None:
    """Refuse (one line, exit 2) a dtype whose range does not hold every value: fp16 stops at 65504 and would write
    inf; the file is never written with a value changed to inf."""
    import torch

    top = torch.finfo(dtype).max
    for name, t in tensors.items():
        if t.is_floating_point() and torch.finfo(t.dtype).max > top and t.numel():
            low, high = t.detach().aminmax()
            peak = max(-low.item(), high.item())
            if peak > top:
                raise UsageError(f"{name} holds {peak:.6g}, beyond {dtype_name(dtype)}'s largest value {top:.6g}: "
                                 f"it would be written as inf; export as bf16 or fp32 (--dtype, export.dtype)")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # float32, bfloat16, float16


def stored_dtype(metadata: dict[str, str]) -> torch.dtype:
    """The dtype an export's header says its weights are stored in (float32 for exports that predate the key)."""
    import torch

    name = metadata.get("dtype", "float32")
    if name not in TORCH_NAMES.values():
        raise UsageError(f"an export's header names the weights' dtype {name!r}; expected one of "
                         f"{', '.join(TORCH_NAMES.values())}")
    return getattr(torch, name)


def export_metadata(recipe, steps: int) -> dict[str, str]:
    """What the weights' header says about where they came from (str -> str, as safetensors wants)."""
    from ..config.recipe import recipe_hash

    return dict(phreg_version=__version__, base_model=recipe.model.name, recipe_hash=recipe_hash(recipe),
                registers=str(recipe.model.registers), steps=str(steps), head=recipe.export.head)


def with_head(student: VisionTransformer, head: str) -> VisionTransformer:
    """`drop`: a copy without the classifier (`num_classes=0`, `forward` returns pooled features), which is what a
    feature user expects and what config.json then says; `keep`: the teacher's head, untouched by distillation."""
    if head == "keep" or student.num_classes == 0:
        return student
    twin = copy.copy(student)  # shallow: the tensors stay shared, only the twin's module tables are its own
    twin._modules, twin._parameters, twin._buffers = dict(twin._modules), dict(twin._parameters), dict(twin._buffers)
    twin.reset_classifier(0)
    return twin


# What timm's pretrained config says about the checkpoint it describes (its Hub tag, license, source, paper): true of
# the Hub's weights only, so an export made from local weights does not carry them.
ORIGIN_KEYS = ("tag", "license", "hf_hub_id", "hf_hub_filename", "url", "file", "origin_url", "paper_ids",
               "paper_name", "notes")


def without_origin(config: dict) -> dict:
    """config.json without the teacher checkpoint's origin fields (`ORIGIN_KEYS`) in its pretrained_cfg."""
    cfg = dict(config.get("pretrained_cfg") or {})
    return {**config, "pretrained_cfg": {k: v for k, v in cfg.items() if k not in ORIGIN_KEYS}}


def export_student(student: VisionTransformer, out: str | Path, mean, std, metadata: dict[str, str],
                   text_tower: Path | None = None, local_weights: bool = False,
                   dtype: torch.dtype | None = None) -> Path:
    """Write the export folder atomically; `metadata` (str -> str) goes into the safetensors header; its `head`
    (keep / drop) says whether the classifier goes with it. `dtype` (default float32): every floating tensor is
    written in it; a value out of its range is refused before anything is written (`check_range`). A CLIP run's text
    tower (`open_clip_text.safetensors`, when the file exists) is linked beside the image tower. `local_weights`: the
    teacher came from a local file, so config.json does not repeat the Hub checkpoint's tag and license
    (`without_origin`)."""
    import torch
    from timm.models._hub import save_config_for_hf

    from ..files.tensorfile import save_file

    out, dtype = Path(out), dtype or torch.float32
    student = with_head(student, metadata.get("head", "drop"))
    tensors = student.state_dict(keep_vars=False)
    check_range(tensors, dtype)
    with writing("the export", out), atomic_dir(out) as tmp:
        if text_tower is not None and Path(text_tower).is_file():
            try:  # the run's own file, never modified: a hard link saves a copy of ~250 MB
                os.link(text_tower, tmp / Path(text_tower).name)
            except OSError:
                shutil.copyfile(text_tower, tmp / Path(text_tower).name)
        # written by Python, not by safetensors' Rust writer: a full disk is then an OSError with its errno
        save_file(tensors, tmp / WEIGHTS, {"format": "pt", **metadata, "dtype": dtype_name(dtype)},
                  dtypes={k: dtype for k, v in tensors.items() if v.is_floating_point()})
        save_config_for_hf(student, tmp / CONFIG, model_config=dict(  # dtype: top level, where timm reads no key
            pretrained_cfg=dict(mean=tuple(mean), std=tuple(std)), dtype=dtype_name(dtype)))
        if local_weights:
            config = json.loads((tmp / CONFIG).read_text())
            (tmp / CONFIG).write_text(json.dumps(without_origin(config), indent=2))
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    with safetensors.safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def export_run(run: str | Path, out: str | Path | None = None, dtype: str | None = None) -> Path:
    """(Re)build a run's export from its latest checkpoint, as `distill` would have written it at that step; `dtype`
    (auto, fp32, bf16, fp16; default: the recipe's `export.dtype`) as `export_dtype` resolves it.

    A checkpoint holds what trains; the student's frozen rest is the base model's weights, so they are loaded as for
    the run (and must be the same file: the checkpoint records their identity). A checkpoint of the first format
    holds every tensor and needs no base weights.
    """
    from ..config.recipe import load_recipe

    run = require_run(run)
    checkpoint = newest_valid(run, move_aside=False)  # a damaged newer one is reported and skipped
    if checkpoint is None:
        raise UsageError(f"{run} has no valid checkpoint to export (expected {run / 'checkpoints' / 'step_N'} with "
                         f"its manifest.json)")
    out = Path(out) if out is not None else run / EXPORT
    if not replaceable(out, {WEIGHTS, CONFIG, TEXT_FILE}):
        raise UsageError(f"refusing to replace {out}: it exists and is not an export folder; choose a new folder")
    recipe = load_recipe(run / RECIPE)
    whole = json.loads((checkpoint / MANIFEST).read_text()).get("format") == "phreg.checkpoint/1"
    student, mean, std = _from_whole(recipe, checkpoint) if whole else _from_base(recipe, checkpoint)
    from ..models.weights import find_weights

    steps = checkpoint_step(checkpoint)
    return export_student(student, out, mean, std, export_metadata(recipe, steps), text_tower=run / TEXT_FILE,
                          local_weights=find_weights(recipe.model).local(recipe.model.name),
                          dtype=export_dtype(recipe, dtype))


def _from_base(recipe, checkpoint: Path):
    """The student as the run built it (base weights, registers), with the checkpoint's trained tensors given to it
    as its own (`assign`: the base model's storage, which the frozen rest shares, is never written)."""
    from ..files.tensorfile import load_file
    from ..models.loading import frozen_dtype, load_teacher, normalization
    from ..models.weights import base_change, find_weights

    m = recipe.model
    try:
        teacher = load_teacher(m, frozen_dtype(recipe.speed))  # the frozen tensors exactly as the run held them
    except UsageError as e:
        raise UsageError(f"phreg export rebuilds the student from the base weights and {checkpoint.name}, which "
                         f"holds only what trains: {e}") from None
    recorded = json.loads((checkpoint / STATE).read_text()).get("base")
    why = base_change(recorded, find_weights(m).identity(m.name, recorded)) if recorded else None
    if why:
        raise UsageError(f"the base weights of {m.name} changed since {checkpoint} was written ({why}); export needs "
                         f"the weights the run was trained on")
    student = _student(recipe, teacher)
    try:
        trained = {k.removeprefix("model."): v for k, v in load_file(checkpoint / MODEL).items()}
    except ValueError as e:
        raise UsageError(f"checkpoint {checkpoint / MODEL} does not load: {e}") from None
    own = student.state_dict()
    misfit = [k for k, v in trained.items() if k not in own or own[k].shape != v.shape]
    if misfit:
        what = f"is not a tensor of {m.name}" if misfit[0] not in own else "has another shape than the student's"
        raise UsageError(f"checkpoint {checkpoint}: its {misfit[0]} {what} (a checkpoint of another recipe?)")
    student.load_state_dict(trained, strict=False, assign=True)
    mean, std = normalization(teacher, m)
    return student, mean, std


def _student(recipe, teacher):
    from ..backbones import add_registers

    m = recipe.model
    return add_registers(teacher, m.registers, m.register_init, m.register_noise, recipe.seed)


def _from_whole(recipe, checkpoint: Path):
    """A first-format checkpoint: every student tensor is in it; the architecture is built empty and overwritten whole
    (strict load: a checkpoint of another recipe is refused)."""
    import safetensors.torch

    from ..models.loading import build_model, normalization
    from ..models.names import check_img_size

    m = recipe.model
    try:
        saved = safetensors.torch.load_file(str(checkpoint / MODEL))
    except Exception as e:  # a truncated or foreign file: safetensors raises its own error types
        raise UsageError(f"checkpoint {checkpoint / MODEL} does not load: {type(e).__name__}: {e}") from None
    check_img_size(build_model(m.name, pretrained=False, device="meta"), m.img_size)
    empty = build_model(m.name, pretrained=False, img_size=m.img_size).eval()
    student = _student(recipe, empty)
    try:
        student.load_state_dict({k.removeprefix("model."): v for k, v in saved.items()})
    except RuntimeError as e:
        raise UsageError(f"checkpoint {checkpoint} does not fit the run's recipe: {str(e).splitlines()[0]}") from None
    return student, *normalization(empty, m)
