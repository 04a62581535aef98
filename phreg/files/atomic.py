"""Writing files safely: atomic file and folder writes (a crash or Ctrl-C never leaves something that looks finished
but is not), a full or read-only disk reported in one line, and content hashes. Torch-free: every command uses it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import DiskError

# A full disk, a quota, a read-only mount or a missing permission: the user's to fix, reported in one line (exit 1).
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def disk_error(e: OSError, what: str, path: str | Path) -> DiskError:
    where = e.filename or path
    hint = {errno.ENOSPC: "free some space there", errno.EDQUOT: "free some space there (disk quota)",
            errno.EROFS: "choose a writable output_dir"}.get(e.errno, "check the folder's permissions")
    return DiskError(f"{e.strerror or os.strerror(e.errno)} while writing {what} to {where}; {hint}")


@contextlib.contextmanager
def writing(what: str, path: str | Path) -> Iterator[None]:
    """Report a full or read-only disk as one line: `<reason> while writing <what> to <path>; <hint>`."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise disk_error(e, what, path) from None
        raise


def human(n: float) -> str:
    """A byte count as people read it: `393.0 MB`."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """A raw binary file that becomes `path` only when the block ends without error: written beside it, fsynced,
    renamed over it; on any error the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual mode
        with os.fdopen(fd, "wb", buffering=0) as f:
            yield f
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_all(f, data) -> None:
    """Write every byte of `data` to a raw (unbuffered) file, which may write less than asked per call."""
    view = memoryview(data)
    while view:
        view = view[f.write(view):]


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write to a temporary file beside `path`, fsync it, then rename over `path`."""
    with atomic_file(path) as f:
        write_all(f, data.encode() if isinstance(data, str) else data)
    return Path(path)


def _finite(obj):
    """JSON has no inf/nan: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | Path, obj) -> Path:
    return write_atomic(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces `path` as a whole, on failure it is removed.

    A folder cannot be renamed over a non-empty one, so an existing `path` is first moved aside and deleted after
    the swap: at every instant `path` is either the old complete folder, absent, or the new complete folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        for f in tmp.iterdir():
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~_umask())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replaceable(path: str | Path, names: set[str], folders: dict[str, set[str]] | None = None) -> bool:
    """May `atomic_dir(path)` replace what is there? Only if it is absent, or a folder holding nothing but `names`
    (an earlier output of the same command) and the subfolders `folders` names, each holding nothing but its own
    names: a mistyped `--out ~` must never delete a folder of the user's."""
    path, folders = Path(path), folders or {}
    if not path.exists():
        return True
    return path.is_dir() and not path.is_symlink() and all(
        (p.name in names and p.is_file()) or (p.name in folders and p.is_dir() and replaceable(p, folders[p.name]))
        for p in path.iterdir())
