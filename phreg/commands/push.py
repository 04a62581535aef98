"""`phreg push RUN --repo-id OWNER/NAME`: upload a finished run to the Hugging Face Hub, model card included, in one
commit (or `--dry-run DIR`: the exact upload folder, nothing uploaded)."""

from __future__ import annotations

import sys
import time

from ..errors import UsageError
from ..files.paths import user_path
from .args import add_command


def add_parser(sub) -> None:
    p = add_command(sub, "push", "upload a finished run to the Hugging Face Hub (model card included)",
                    "Upload RUN/export with its recipe.yaml, a model card README.md and, when RUN/eval has a report, "
                    "its table and first figure, as one commit. The token comes from HF_TOKEN or the cached login "
                    "(`hf auth login`); HF_ENDPOINT picks another Hub.",
                    "example: phreg push runs/quickstart --repo-id alice/dinov2-small-reg16 --dry-run hub/")
    p.add_argument("run", type=user_path, help="run folder with a finished export/")
    p.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="model repository, created if missing")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its own)")
    p.add_argument("--revision", metavar="BRANCH", help="commit to this branch, created if missing (default: main)")
    p.add_argument("--commit-message", metavar="MSG", help="default: phreg VERSION: TEACHER + R registers, N steps")
    p.add_argument("--dry-run", type=user_path, metavar="DIR",
                   help="write the exact upload folder to DIR and upload nothing")
    p.add_argument("--tries", type=int, default=4, metavar="N",
                   help="attempts per Hub call on network errors, 429 and 5xx")
    p.add_argument("--retry-wait", type=float, default=2.0, metavar="S", help="first wait between tries, doubling")
    p.add_argument("--format", default="timm", choices=("timm", "transformers", "both"),
                   help="timm (default); transformers: Dinov2WithRegistersModel in its place (DINOv2 family); both: "
                        "timm's at the root, transformers' in transformers/ (the card shows how to load each)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..hub.publish import PushError, check_repo_id, dry_run, push
    from ..run.lock import refuse_if_held

    check_repo_id(args.repo_id)
    refuse_if_held(args.run, "push publishes a run once it has finished; push it then")
    if args.tries < 1 or args.retry_wait < 0:
        raise UsageError("--tries must be >= 1 and --retry-wait >= 0")
    began = time.perf_counter()
    if args.dry_run:
        names = dry_run(args.run, args.repo_id, args.dry_run, args.format)
        print(f"dry run: wrote {', '.join(names)} to {args.dry_run} in {time.perf_counter() - began:.1f}s; "
              "nothing uploaded")
        return 0
    try:
        print(push(args.run, args.repo_id, private=args.private, revision=args.revision,
                   commit_message=args.commit_message, tries=args.tries, wait=args.retry_wait, fmt=args.format))
    except PushError as e:
        print(f"phreg: error: {e}", file=sys.stderr)
        return 1
    print(f"pushed in {time.perf_counter() - began:.1f}s", file=sys.stderr)
    return 0
