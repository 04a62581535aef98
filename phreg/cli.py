"""`phreg` command line. User mistakes are one line on stderr and exit code 2; no tracebacks."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from . import __version__
from .errors import UsageError


def _distill(args) -> int:
    from .recipe import load_recipe
    from .train import distill

    recipe = load_recipe(args.recipe, args.overrides)
    run = distill(recipe, resume=args.resume, cpu=args.cpu, quiet=args.quiet)
    print(f"done: {run / 'export'}")
    return 0


def _export(args) -> int:
    from .export import export_run

    print(f"exported {export_run(args.run, args.out)}")
    return 0


def _push(args) -> int:
    from .publish import PushError, dry_run, push

    if args.dry_run:
        names = dry_run(args.run, args.repo_id, args.dry_run)
        print(f"dry run: wrote {', '.join(names)} to {args.dry_run}; nothing uploaded")
        return 0
    if args.tries < 1 or args.retry_wait < 0:
        raise UsageError("--tries must be >= 1 and --retry-wait >= 0")
    try:
        print(push(args.run, args.repo_id, private=args.private, revision=args.revision,
                   commit_message=args.commit_message, tries=args.tries, wait=args.retry_wait))
    except PushError as e:
        print(f"phreg: error: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phreg", description="Give a pretrained Vision Transformer register tokens after the fact (PH-Reg).")
    parser.add_argument("--version", action="version", version=f"phreg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("distill", help="distill registers into a pretrained ViT following a recipe",
                       description="Train a student with register tokens to reproduce the teacher's denoised "
                                   "features; writes RUN/{recipe.yaml,metrics.jsonl,checkpoints/,export/}.",
                       epilog="example: phreg distill recipes/quickstart.yaml train.epochs=1 output_dir=runs/try")
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted recipe overrides, e.g. data.root=DIR model.checkpoint=FILE output_dir=RUN")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    p.set_defaults(func=_distill)

    p = sub.add_parser("export", help="(re)build a run's export folder from its latest checkpoint",
                       description="Write RUN/export/{model.safetensors,config.json} (or --out DIR) from the run's "
                                   "latest checkpoint, as distill does at the end; the teacher's weights are not needed.")
    p.add_argument("run", help="run folder (output_dir of phreg distill)")
    p.add_argument("--out", metavar="DIR", help="where to write the export (default: RUN/export), replaced atomically")
    p.set_defaults(func=_export)

    p = sub.add_parser("push", help="upload a finished run to the Hugging Face Hub (model card included)",
                       description="Upload RUN/export with its recipe.yaml, a model card README.md and, when RUN/eval "
                                   "has a report, its table and first figure, as one commit. The token comes from "
                                   "HF_TOKEN or the cached login (`hf auth login`); HF_ENDPOINT picks another Hub.",
                       epilog="example: phreg push runs/quickstart --repo-id alice/dinov2-small-reg16 --dry-run hub/")
    p.add_argument("run", help="run folder with a finished export/")
    p.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="model repository, created if missing")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its own)")
    p.add_argument("--revision", metavar="BRANCH", help="commit to this branch, created if missing (default: main)")
    p.add_argument("--commit-message", metavar="MSG", help="default: phreg VERSION: TEACHER + R registers, N steps")
    p.add_argument("--dry-run", metavar="DIR", help="write the exact upload folder to DIR and upload nothing")
    p.add_argument("--tries", type=int, default=4, metavar="N", help="attempts per Hub call on network errors, 429 and 5xx")
    p.add_argument("--retry-wait", type=float, default=2.0, metavar="S", help="first wait between tries, doubling")
    p.set_defaults(func=_push)
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
    from .train import Aborted

    try:
        return args.func(args)
    except UsageError as e:
        print(f"phreg: error: {e}", file=sys.stderr)
        return 2
    except Aborted as e:
        print(f"phreg: aborted: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("phreg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
