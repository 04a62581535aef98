"""The exception types the command line turns into one line: usage mistakes (exit 2) and deliberate stops (exit 1).

Kept free of heavy imports so that `phreg` can report a mistake before torch or timm is loaded.
"""


class UsageError(Exception):
    """A bad recipe, path, model or argument: the CLI prints it as one line and exits with code 2."""


class DiskError(Exception):
    """A full, read-only or forbidden output folder: the CLI prints it as one line and exits with code 1."""


class Aborted(RuntimeError):
    """Training stopped on purpose (too many non-finite steps): one line, exit code 1."""
