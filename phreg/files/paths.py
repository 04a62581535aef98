"""Paths users type: `~` in option values, and output folders checked before anything is written. Torch-free."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError


def user_path(text: str | None) -> str | None:
    """argparse `type=`: `--images=~/photos` (no shell expands `~` after `=`)."""
    return os.path.expanduser(text) if text is not None else None


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def check_file(path: str | None, what: str, weights: bool = False) -> None:
    """A file the user named: there, and a file. A folder is said to be one; for a weights file (`weights`), with the
    weights files in it or, for a timm export folder, how to name that instead."""
    if path is None or Path(path).is_file():
        return
    if not Path(path).is_dir():
        raise UsageError(f"{what} {path} not found")
    if not weights:
        raise UsageError(f"{what} {path} is a folder, not a file")
    folder = Path(path)
    inside = sorted(p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(inside) == 1:
        hint = f"pass the weights file in it: {folder / inside[0]}"
    elif inside:
        more = ", ..." if len(inside) > 3 else ""
        hint = f"pass one of the {len(inside)} weights files in it ({', '.join(inside[:3])}{more})"
    else:
        hint = "pass a .safetensors (or .pth/.bin) file"
    if (folder / "config.json").is_file():
        hint += f"; it is a timm export folder, a model in itself: name it as the model (local-dir:{folder})"
    raise UsageError(f"{what} {path} is a folder, not a weights file; {hint}")


def check_out(path: str | Path | None, what: str = "--out") -> None:
    """An output folder: absent (created later) or a folder, and never inside a file."""
    if path is None:
        return
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"{what} {path}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK):
                raise UsageError(f"{what} {path}: {p} is not writable")
            return
