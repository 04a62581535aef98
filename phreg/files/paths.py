"""Paths users type: `~` in option values, and output folders checked before anything is written. Torch-free."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError


def user_path(text: str | None) -> str | None:
    """argparse `type=`: `--images=~/photos` (no shell expands `~` after `=`)."""
    return os.path.expanduser(text) if text is not None else None


def check_file(path: str | None, what: str) -> None:
    if path is not None and not Path(path).is_file():
        raise UsageError(f"{what} {path} not found")


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
