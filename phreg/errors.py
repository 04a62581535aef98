"""The one exception type that means "the user asked for something impossible"."""


class UsageError(Exception):
    """A bad recipe, path, model or argument: the CLI prints it as one line and exits with code 2."""
