"""Stopping cleanly: preemption signals, Ctrl-C and timed checkpoints, agreed on by every process.

Clusters announce the end of a job with a signal (SLURM `--signal`, Kubernetes and spot instances SIGTERM) and kill it
a little later. On such a signal (`train.stop_signals`, default SIGTERM and SIGUSR1) or a first Ctrl-C the loop
finishes the optimizer step it is in, writes a checkpoint and stops with `Preempted` (Ctrl-C: `Interrupted`, a
KeyboardInterrupt, so that in-process callers stop too); a second Ctrl-C before the checkpoint starts quits at once
(the previous checkpoint stays valid), and signals that arrive while the checkpoint is being written wait until it is
complete.

Under DDP every process must stop (and save) after the same step. Each process keeps two local flags, "stop" and "a
timed checkpoint is due", and the flags are max-reduced at step boundaries through an asynchronous all-reduce on the
CPU (gloo): the result of step t's reduce is read at step t+1, so it costs no host-device sync and never waits for a
slow rank, and every process reads the same result, so all of them stop after the same step.
"""

from __future__ import annotations

import signal
import sys
import time

import torch
import torch.distributed as dist


def say_above_bars(line: str) -> None:
    """A line on stderr that starts on a line of its own: a live progress bar is cleared first and drawn again below
    it (tqdm.write), instead of the line landing on the bar's tail."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


def signal_number(name: str) -> int:
    name = name.upper()
    return getattr(signal, name if name.startswith("SIG") else f"SIG{name}")


class StopRequests:
    """Install with `with StopRequests(...) as stop:`; call `stop.poll()` once per optimizer step (every process).

    poll() -> (stop, save_due): stop after this step / write a timed checkpoint now."""

    def __init__(self, acc, signals: list[str], save_every_minutes: float, say=None,
                 stopping: str = "stopping after this step with a checkpoint",
                 quitting: str = "Ctrl-C again to quit without one"):
        self.acc, self.say, self.stopping, self.quitting = acc, say or say_above_bars, stopping, quitting
        self.signals = [signal.SIGINT, *(signal_number(s) for s in signals)]
        self.every_s = save_every_minutes * 60
        self.requested: str | None = None  # name of the first signal received (by any process, once agreed)
        self.signum = 0
        self.saving = False
        self.last_save = time.monotonic()
        self.old = {}
        self.group, self.pending = None, None
        if acc.num_processes > 1:
            # flags travel through gloo on the CPU: an NCCL reduce would need a device tensor and a sync to read it
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            self.flags = torch.zeros(2)

    def __enter__(self) -> "StopRequests":
        for sig in self.signals:
            self.old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        self.settle()

    def settle(self) -> None:
        """Wait for the last flag reduce (before the process group goes away)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested, self.signum = name, signum
            if self.acc.is_local_main_process:
                extra = f"; {self.quitting}" if signum == signal.SIGINT else ""
                self.say(f"phreg: {name}: {self.stopping}{extra}")
        elif signum == signal.SIGINT and not self.saving:
            raise KeyboardInterrupt  # the second Ctrl-C: the user means it; the last checkpoint stays valid

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def poll(self) -> tuple[bool, bool]:
        due = self.every_s > 0 and time.monotonic() - self.last_save >= self.every_s
        if self.acc.num_processes == 1:
            return self.requested is not None, due
        agreed = (False, False)
        if self.pending is not None:  # the reduce issued one step ago; identical on every process
            self.pending.wait()
            agreed = (bool(self.flags[0] > 0), bool(self.flags[1] > 0))
            if agreed[0] and self.requested is None:  # another process got the signal: report its name
                self.requested = signal.Signals(int(self.flags[0])).name
        if agreed[1]:
            self.saved()  # every process resets its timer before sending its next flags
            due = False
        self.flags = torch.tensor([float(self.signum), float(due)])
        self.pending = dist.all_reduce(self.flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed
