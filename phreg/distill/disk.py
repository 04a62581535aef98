"""Disk space: what a run will write, checked before training; a full or read-only disk mid-run is one line.

Shared clusters fill their disks and mount folders read-only. A run estimates its output up front (checkpoints x
keep_last, the target cache, the export) and refuses to start when the filesystem clearly has less. During the run,
every write goes through `phreg.files.writing(what, path)`, which turns the `OSError` of a full disk, a quota, a
read-only mount or a missing permission into a `DiskError` naming the path and what was being written (exit code 1,
no traceback); the temporary-then-rename writes around it make sure nothing half-written is left looking finished.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import DiskError
from ..files.atomic import human


def existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_space(needs: list[tuple[Path, int, str]]) -> str:
    """`needs`: (folder, bytes, label) of everything the run will still write. Raises `DiskError` when a
    filesystem has less free space than its share; returns a one-line summary for the run's header."""
    by_fs: dict[int, list] = {}
    for folder, size, label in needs:
        where = existing_parent(folder)
        by_fs.setdefault(os.stat(where).st_dev, [where, 0, []])
        entry = by_fs[os.stat(where).st_dev]
        entry[1] += size
        entry[2].append(f"{label} {human(size)}")
    lines = []
    for where, size, parts in by_fs.values():
        free = shutil.disk_usage(where).free
        if free < size:
            raise DiskError(f"not enough disk space: the run will write about {human(size)} under {where} "
                            f"({', '.join(parts)}) but only {human(free)} is free; free some space, lower "
                            f"train.keep_last or choose another output_dir")
        lines.append(f"writes up to {human(size)} under {where} ({', '.join(parts)}; {human(free)} free)")
    return "; ".join(lines)
