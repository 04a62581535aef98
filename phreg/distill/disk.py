"""Disk space: what a run will write, checked before training; a full or read-only disk mid-run is one line.

Shared clusters fill their disks and mount folders read-only. A run estimates its output up front (checkpoints x
keep_last, the target cache, the export) and refuses to start when the filesystem clearly has less. During the run,
every write goes through `writing(what, path)`, which turns the `OSError` of a full disk, a quota, a read-only mount or
a missing permission into a `DiskError` naming the path and what was being written (exit code 1, no traceback);
the temporary-then-rename writes around it make sure nothing half-written is left looking finished.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from ..errors import DiskError

DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def disk_error(e: OSError, what: str, path: str | Path) -> DiskError:
    where = e.filename or path
    hint = {errno.ENOSPC: "free some space there", errno.EDQUOT: "free some space there (disk quota)",
            errno.EROFS: "choose a writable output_dir"}.get(e.errno, "check the folder's permissions")
    return DiskError(f"{e.strerror or os.strerror(e.errno)} while writing {what} to {where}; {hint}")


@contextlib.contextmanager
def writing(what: str, path: str | Path) -> Iterator[None]:
    """Report a full or read-only disk as one line: `could not write <what>: <path>: <reason>`."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise disk_error(e, what, path) from None
        raise


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
