"""One writer per run folder (`phreg.run.lock`): real processes hold and are refused; a stale lock is reclaimed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from phreg.errors import UsageError
from phreg.run.lock import LOCK_FILE, hold, holder

# A process that holds RUN's lock as distill does and says so. "hold": it then waits to be killed. "orphan": it forks
# a child that inherits the lock (as a data-loader worker does) and exits at once; the child keeps the lock.
HOLDER = textwrap.dedent("""
    import os, sys, time
    from phreg.run.lock import hold
    run, how = sys.argv[1], sys.argv[2]
    with hold(run, "phreg distill"):
        if how == "orphan":
            child = os.fork()
            if child == 0:
                time.sleep(60)
                os._exit(0)
            print("holding", child, flush=True)
            os._exit(0)
        print("holding", os.getpid(), flush=True)
        time.sleep(60)
""")


def start_holder(run: Path, how: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), how], stdout=subprocess.PIPE, text=True)
    word, pid = proc.stdout.readline().split()
    assert word == "holding"
    return proc, int(pid)


def test_a_second_writer_is_refused_naming_the_holder_and_the_lock_goes_with_its_process(tmp_path):
    run = tmp_path / "run"
    proc, pid = start_holder(run, "hold")
    try:
        info = holder(run)
        assert info["pid"] == pid and info["host"] == socket.gethostname() and info["command"] == "phreg distill"
        with pytest.raises(UsageError) as e:
            with hold(run, "phreg distill"):
                pass
        assert str(e.value).startswith(f"{run} is being written by phreg distill on host {socket.gethostname()}, "
                                       f"PID {pid}, since 20")
        assert str(e.value).endswith("a run folder has one writer at a time: wait for it to end, or choose another "
                                     "output_dir") and "\n" not in str(e.value)
    finally:
        proc.kill()  # SIGKILL: no cleanup runs; the kernel releases the lock
        proc.wait()
    assert holder(run) is None
    with hold(run, "phreg distill"):
        assert holder(run) is None  # our own lock does not count against us
        with hold(run, "phreg distill"):  # re-entrant in one process (distill inside the CLI's export, ...)
            pass
    assert (run / LOCK_FILE).is_file()


def test_a_stale_lock_of_a_dead_process_on_this_host_is_reclaimed(tmp_path, capfd):
    run = tmp_path / "run"
    run.mkdir()
    proc, child = start_holder(run, "orphan")
    proc.wait()
    try:
        os.kill(child, 0)  # the orphan lives and holds the lock; the record names its dead parent
        assert holder(run) is None  # stale: not reported as a holder
        with hold(run, "phreg distill"):
            assert f"reclaimed the lock of {run}" in capfd.readouterr().err
            other = subprocess.run([sys.executable, "-c", "import sys; from phreg.run.lock import hold\n"
                                    "with hold(sys.argv[1], 'phreg export'): pass", str(run)],
                                   capture_output=True, text=True)
            assert other.returncode == 1 and f"PID {os.getpid()}" in other.stderr  # the new lock holds
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_lock_taken_for_nothing_leaves_no_folder(tmp_path):
    with pytest.raises(UsageError):
        with hold(tmp_path / "new", "phreg distill"):
            raise UsageError("a mistake found after the lock")
    assert not (tmp_path / "new").exists()
