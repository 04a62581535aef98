"""The `phreg` subcommands, one module each: its arguments (`add_parser`), the checks that run before torch loads,
the wiring, and what it prints (`run`). `phreg/cli.py` only builds the parser from these and turns errors into exit
codes. Importing this package is cheap: each command imports the heavy machinery when it runs."""

from . import distill, estimate, eval, export, inspect, push, segment

COMMANDS = (distill, estimate, inspect, eval, segment, export, push)  # in `phreg --help`'s order
