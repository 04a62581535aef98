"""`phreg`: the command line. The subcommands live in `phreg/commands/`, one module each; this builds the parser from
them and turns the errors a command raises into one line and an exit code (2 usage, 1 runtime failure)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from . import __version__
from .commands import COMMANDS
from .commands.args import HelpFormatter
from .errors import Aborted, DiskError, UsageError
from .files.atomic import DISK_ERRNOS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phreg", description="Give a pretrained Vision Transformer register tokens after the fact (PH-Reg).",
        formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"phreg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*Mapping deprecated model name.*")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides may come after options too: `phreg distill r.yaml --resume a=1`
        if getattr(args, "overrides", None) is not None and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (UsageError, DiskError) as e:
        print(f"phreg: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except Aborted as e:
        print(f"phreg: aborted: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a write not wrapped in `writing`: still one line
        if e.errno not in DISK_ERRNOS:
            raise
        print(f"phreg: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("phreg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
