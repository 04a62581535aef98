"""The one exception type that means "the user asked for something impossible"."""


class UsageError(Exception):
    """A bad recipe, path, model or argument: the CLI prints it as one line and exits with code 2."""


class DiskError(Exception):
    """A full, read-only or forbidden output folder: the CLI prints it as one line and exits with code 1."""
