"""Export: `model.safetensors` + `config.json` in timm's Hugging Face layout.

`timm.create_model('local-dir:RUN/export', pretrained=True)` rebuilds the student, registers included, without phreg.
The folder is written whole or not at all (see `files.atomic_dir`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors

from .. import __version__
from ..errors import UsageError
from ..files import atomic_dir, replaceable, writing
from ..run import (CONFIG, EXPORT, MODEL, RECIPE, TEXT_FILE, WEIGHTS, checkpoint_step, newest_valid,
                   require_run)

if TYPE_CHECKING:  # torch and timm are imported where they are used: `phreg export RUN` checks RUN first
    from timm.models.vision_transformer import VisionTransformer


def export_metadata(recipe, steps: int) -> dict[str, str]:
    """What the weights' header says about where they came from (str -> str, as safetensors wants)."""
    from ..recipe import recipe_hash

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
                   text_tower: Path | None = None, local_weights: bool = False) -> Path:
    """Write the export folder atomically; `metadata` (str -> str) goes into the safetensors header; its `head`
    (keep / drop) says whether the classifier goes with it. A CLIP run's text tower (`open_clip_text.safetensors`,
    when the file exists) is linked beside the image tower. `local_weights`: the teacher came from a local file, so
    config.json does not repeat the Hub checkpoint's tag and license (`without_origin`)."""
    import safetensors.torch
    from timm.models._hub import save_config_for_hf

    out = Path(out)
    student = with_head(student, metadata.get("head", "drop"))
    with writing("the export", out), atomic_dir(out) as tmp:
        if text_tower is not None and Path(text_tower).is_file():
            try:  # the run's own file, never modified: a hard link saves a copy of ~250 MB
                os.link(text_tower, tmp / Path(text_tower).name)
            except OSError:
                shutil.copyfile(text_tower, tmp / Path(text_tower).name)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in student.state_dict().items()}
        # written by Python, not by safetensors' Rust writer: a full disk is then an OSError with its errno
        (tmp / WEIGHTS).write_bytes(safetensors.torch.save(tensors, metadata={"format": "pt", **metadata}))
        _sort_metadata(tmp / WEIGHTS)
        save_config_for_hf(student, tmp / CONFIG,
                           model_config=dict(pretrained_cfg=dict(mean=tuple(mean), std=tuple(std))))
        if local_weights:
            config = json.loads((tmp / CONFIG).read_text())
            (tmp / CONFIG).write_text(json.dumps(without_origin(config), indent=2))
    return out


def _sort_metadata(path: Path) -> None:
    """Sort the header's metadata keys in place, so the same student always exports to the same bytes.

    safetensors writes its metadata from a Rust HashMap, in an order that changes from process to process. Sorting
    only reorders keys, so the header keeps its length and every tensor offset stays valid.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) <= n:  # always equal for keys safetensors wrote; never grow the header
            f.seek(8)
            f.write(new.ljust(n, b" "))


def read_metadata(path: str | Path) -> dict[str, str]:
    with safetensors.safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def export_run(run: str | Path, out: str | Path | None = None) -> Path:
    """(Re)build a run's export from its latest checkpoint, as `distill` would have written it at that step.

    The checkpoint holds every student tensor, so the teacher's weights are not needed: the architecture is built
    empty, given its registers, and overwritten whole (strict load: a checkpoint of another recipe is refused).
    """
    from ..recipe import load_recipe

    run = require_run(run)
    checkpoint = newest_valid(run, move_aside=False)  # a damaged newer one is reported and skipped
    if checkpoint is None:
        raise UsageError(f"{run} has no valid checkpoint to export (expected {run / 'checkpoints' / 'step_N'} with "
                         f"its manifest.json)")
    out = Path(out) if out is not None else run / EXPORT
    if not replaceable(out, {WEIGHTS, CONFIG, TEXT_FILE}):
        raise UsageError(f"refusing to replace {out}: it exists and is not an export folder; choose a new folder")
    recipe = load_recipe(run / RECIPE)
    m = recipe.model
    import safetensors.torch

    from ..backbones import add_registers
    from ..models import _create, check_img_size, normalization

    try:
        saved = safetensors.torch.load_file(str(checkpoint / MODEL))
    except Exception as e:  # a truncated or foreign file: safetensors raises its own error types
        raise UsageError(f"checkpoint {checkpoint / MODEL} does not load: {type(e).__name__}: {e}") from None
    check_img_size(_create(m.name, pretrained=False, device="meta"), m.img_size)
    empty = _create(m.name, pretrained=False, img_size=m.img_size).eval()
    student = add_registers(empty, m.registers, m.register_init, m.register_noise, recipe.seed)
    try:
        student.load_state_dict({k.removeprefix("model."): v for k, v in saved.items()})
    except RuntimeError as e:
        raise UsageError(f"checkpoint {checkpoint} does not fit the run's recipe: {str(e).splitlines()[0]}") from None
    mean, std = normalization(empty, m)
    steps = checkpoint_step(checkpoint)
    from ..models import find_weights

    return export_student(student, out, mean, std, export_metadata(recipe, steps), text_tower=run / TEXT_FILE,
                          local_weights=find_weights(m).local(m.name))
