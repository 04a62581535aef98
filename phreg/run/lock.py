"""One writer per run folder: an advisory lock on `RUN/.phreg.lock`, taken by the process that writes the run.

A requeued job whose predecessor still runs, or a command started twice, would otherwise train in the same folder at
once (interleaved metrics, the export of whichever finished last). `distill` (its main process) and `phreg export`
into the run folder hold the lock while they write; a second writer is refused in one line naming the holder (host,
PID, since when), exit code 2. Readers never take it: `inspect` and `eval` read a locked run's finished export (it is
replaced atomically, so they see the old one or the new one) and say that the run is being written; `export --out`
elsewhere reads its newest verified checkpoint the same way; `push` refuses a locked run (a run in flux is not
published).

The lock is `flock(2)` on the file, so the kernel releases it when the holder ends however it ends (exit, exception,
SIGKILL, out of memory): a dead process leaves no lock on a local disk. On NFS, Linux implements flock with the
server's POSIX locks (NFSv4, or v3 with lockd): released when the process ends, and after a client crash once the
server's lease runs out (about 90 s on NFSv4). A filesystem without locks (an NFS mount with `nolock`, some FUSE
filesystems) answers ENOLCK: phreg then says once that the folder is unguarded and goes on. What a lock cannot cover:
two hosts on a filesystem whose locks are local to each client (NFS `local_lock=flock`) do not see each other's lock.

A lock can outlive its holder on this host when a child process inherited it (a data-loader worker forked from the
trainer that was killed): the file names a dead PID while the lock is still held. Such a lock is reclaimed: the file
is replaced by a fresh one (under a second lock, so that two processes never both reclaim), and the new run holds
that. Torch-free: every command can ask in milliseconds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import UsageError

LOCK_FILE = ".phreg.lock"
WRITER = "a run folder has one writer at a time: wait for it to end, or choose another output_dir"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_held: dict[Path, int] = {}  # lock files this process holds -> how many `hold`s deep (flock is per open file)
_warned: set[Path] = set()


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc), to tell it from a later process with its PID."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(info: dict) -> bool:
    """Is the process a lock record names still running (this host only)? A reused PID is not the holder."""
    pid = info.get("pid")
    if not isinstance(pid, int):
        return True  # unknown: assume the worst
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = info.get("start_ticks")
    return started is None or _start_ticks(pid) in (None, started)


def _try_lock(fd: int, shared: bool = False) -> bool | None:
    """True: locked; False: another holder; None: this filesystem does not lock."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return None
        raise


def _read(path: Path) -> dict:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def describe(info: dict) -> str:
    """`phreg distill on host gpu07, PID 4242, since 2026-11-28 10:12:03 UTC`."""
    if not info:
        return "a process that has not said who it is"
    return (f"{info.get('command', 'phreg')} on host {info.get('host', '?')}, PID {info.get('pid', '?')}, "
            f"since {info.get('since', '?')}")


def holder(run: str | Path) -> dict | None:
    """Who holds `run`'s lock right now (its record), or None when nobody does; never creates or changes a file.
    This process's own lock does not count."""
    path = Path(run) / LOCK_FILE
    if path.resolve() in _held:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        got = _try_lock(fd, shared=True)
        if got:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        if got is None:  # no locks here: only the record can tell
            info = _read(path)
            return info if info and info.get("host") == socket.gethostname() and _alive(info) else None
        info = _read(path)
        if info.get("host") == socket.gethostname() and not _alive(info):
            return None  # a stale lock: the next writer reclaims it
        return info
    finally:
        os.close(fd)


def refused(run: str | Path, info: dict, why: str = WRITER) -> UsageError:
    """The one-line refusal: who holds the run, and `why` (what the asking command may not do, and what to do)."""
    return UsageError(f"{run} is being written by {describe(info)} (lock {LOCK_FILE}); {why}")


def refuse_if_held(run: str | Path, why: str = WRITER) -> None:
    """Refuse (one line, exit 2) when another process holds `run`'s lock: a second writer, or a reader that must not
    read a run in flux (`why` says which)."""
    info = holder(run)
    if info is not None:
        raise refused(run, info, why)


def note_if_held(run: str | Path, reading: str) -> None:
    """A line on stderr when a command reads a run that another process writes (what it reads is still whole)."""
    info = holder(run)
    if info is not None:
        print(f"phreg: note: {run} is being written by {describe(info)}; {reading}", file=sys.stderr)


@contextlib.contextmanager
def hold(run: str | Path, command: str):
    """Hold `run`'s lock while the block runs (re-entrant within one process); refuse in one line when another
    process holds it. Creates the folder; removes it again if the lock file is all it ever held."""
    run = Path(run)
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    path = (run / LOCK_FILE).resolve()
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    fd = _acquire(run, path, command)
    _held[path] = 1
    try:
        yield
    finally:
        del _held[path]
        if created and sorted(p.name for p in run.iterdir()) == [LOCK_FILE]:
            path.unlink(missing_ok=True)  # before the lock goes: nobody can take a lock on a file about to vanish
            with contextlib.suppress(OSError):
                run.rmdir()
        if fd is not None:
            os.close(fd)  # releases the lock


def _acquire(run: Path, path: Path, command: str) -> int | None:
    retried = False
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        got = _try_lock(fd)
        if got is None:
            os.close(fd)
            if path not in _warned:
                _warned.add(path)
                print(f"phreg: warning: {run}'s filesystem does not support file locks; nothing stops a second "
                      "process from writing this run folder at the same time", file=sys.stderr)
            return None
        if got:
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino  # not a file replaced by a reclaim meanwhile
            except FileNotFoundError:
                same = False
            if same:
                _record(fd, command)
                return fd
            os.close(fd)
            continue
        info = _read(path)
        os.close(fd)
        if not info and not retried:  # a reader's probe of an instant, or a holder between lock and record
            retried = True
            time.sleep(0.2)
            continue
        if info.get("host") == socket.gethostname() and not _alive(info):
            _reclaim(path, info)
            continue
        raise refused(run, info)
    raise UsageError(f"{run}: could not take the lock {path.name} after several tries; is another phreg starting "
                     "in this folder?")


def _record(fd: int, command: str) -> None:
    """Who holds the lock, for the refusal line of the next one who asks."""
    info = dict(command=command, host=socket.gethostname(), pid=os.getpid(), start_ticks=_start_ticks(os.getpid()),
                since=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    data = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _reclaim(path: Path, stale: dict) -> None:
    """Replace a lock file whose holder is dead on this host by a fresh one, under a second lock so that two
    processes never both do; the caller then locks the new file as usual."""
    guard = os.open(path.with_name(LOCK_FILE + ".reclaim"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if _read(path) != stale:  # someone reclaimed it already (and may hold it now)
            return
        fresh = path.with_name(f"{LOCK_FILE}.{os.getpid()}")
        fresh.touch()
        os.replace(fresh, path)
        print(f"phreg: warning: reclaimed the lock of {path.parent}: {describe(stale)} has ended, but a process it "
              "left behind still held the lock", file=sys.stderr)
    finally:
        os.close(guard)
