"""Where a CPU `phreg distill` run's resident memory goes, phase by phase (README "Scale").

    python benchmarks/rss_phases.py RECIPE [key=value ...] [--quiet]

Runs `phreg distill` in this process while a thread samples its resident set (/proc/self/statm) every 5 ms, and
marks the entry and exit of phreg's own functions on the way: loading the teacher, building the student, the
teacher's views, the student's forward, the loss, backward (up to the gradient check), the optimizer step, the
checkpoint and the export. Prints, for each span between two marks, the resident memory at its start, its maximum
and at its end, then the peak (the figure `/usr/bin/time -f %M` reports, here in GB). Linux only (reads /proc).
"""

from __future__ import annotations

import importlib
import itertools
import resource
import sys
import threading
import time

samples: list[tuple[float, int]] = []
marks: list[tuple[float, str]] = []


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def sample() -> None:
    while True:
        samples.append((time.perf_counter(), resident()))
        time.sleep(0.005)


def mark(label: str) -> None:
    marks.append((time.perf_counter(), label))


def marked(owner, name: str, label: str, then: str | None = None) -> None:
    """Mark entry (`label`) and exit (`then`) of `owner.name`, a phreg module's function or a phreg class's method."""
    real = getattr(owner, name)

    def call(*args, **kwargs):
        mark(label)
        try:
            return real(*args, **kwargs)
        finally:
            mark(then or f"after {label}")

    setattr(owner, name, call)


def main(argv: list[str]) -> int:
    began = time.perf_counter()
    threading.Thread(target=sample, daemon=True).start()
    mark("imports")
    from phreg.backbones import PatchTokens
    from phreg.cli import main as phreg
    from phreg.targets.teacher import DenoisedTeacher

    step = importlib.import_module("phreg.distill.step")
    loop = importlib.import_module("phreg.distill.loop")
    mark("recipe, data, set-up")
    marked(step, "load_teacher", "teacher weights", then="student, optimizer")
    marked(DenoisedTeacher, "forward", "teacher views", then="(after teacher views)")
    marked(PatchTokens, "forward", "forward", then="after forward")  # student; also in teacher views, scores
    marked(step, "distill_loss", "loss", then="backward")
    marked(step, "skip_if_nonfinite", "optimizer step", then="optimizer step")  # called between backward and step
    marked(loop, "_save", "checkpoint")
    marked(loop, "export_student", "export")
    code = phreg(["distill", *argv])
    mark("end")
    time.sleep(0.02)
    print(f"{'phase':<24} {'at':>8} {'start':>7} {'max':>7} {'end':>7}  (GB resident)")
    for (t0, label), (t1, _) in itertools.pairwise(marks):
        inside = [r for t, r in samples if t0 <= t < t1]
        if inside:
            print(f"{label:<24} {t0 - began:7.1f}s {inside[0] / 1e9:7.3f} {max(inside) / 1e9:7.3f} "
                  f"{inside[-1] / 1e9:7.3f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak resident {peak / 1e9:.3f} GB (ru_maxrss)")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
