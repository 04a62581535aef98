"""The exception types the command line turns into one line: usage mistakes (exit 2), deliberate stops (exit 1),
and runs stopped by a signal after saving what they had (exit 75, Ctrl-C 130).

Kept free of heavy imports so that `phreg` can report a mistake before torch or timm is loaded.
"""


class UsageError(Exception):
    """A bad recipe, path, model or argument: the CLI prints it as one line and exits with code 2."""


class DiskError(Exception):
    """A full, read-only or forbidden output folder: the CLI prints it as one line and exits with code 1."""


class Aborted(RuntimeError):
    """Training stopped on purpose (too many non-finite steps): one line, exit code 1."""


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint (or the target cache's build stopped, keeping what it
    computed: `kept` says what); the CLI prints how to resume."""

    def __init__(self, step: int, checkpoint, signame: str, kept: str | None = None):
        super().__init__(f"preempted at step {step} by {signame}")
        self.step, self.checkpoint, self.signame, self.kept = step, checkpoint, signame, kept


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: training stopped after writing a checkpoint. A KeyboardInterrupt, so that whoever called `distill()`
    in-process (pytest, a notebook, a script) stops as Ctrl-C means, instead of recording an error and going on;
    the CLI reads the same attributes as `Preempted`'s for its resume hint and exits 130."""

    def __init__(self, step: int, checkpoint, signame: str = "SIGINT", kept: str | None = None):
        super().__init__(f"interrupted at step {step} by {signame}; checkpoint {checkpoint}")
        self.step, self.checkpoint, self.signame, self.kept = step, checkpoint, signame, kept


def stopped(step: int, checkpoint, signame: str, kept: str | None = None) -> BaseException:
    """What a stop request raises once its checkpoint (or what a stopped cache build `kept`) is written: `Interrupted`
    for Ctrl-C, else `Preempted`."""
    return (Interrupted if signame == "SIGINT" else Preempted)(step, checkpoint, signame, kept)
