"""`phreg distill RECIPE [key=value ...]`: train a student with registers; resume, auto-resume, and the exit codes
of a run stopped by a signal."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from .args import add_command

# Exit codes besides 0 (done), 1 (runtime failure) and 2 (usage): stopped on a signal after writing a checkpoint (or
# keeping the target cache's finished entries); 75 is sysexits' EX_TEMPFAIL ("try again later"), 130 Ctrl-C's.
EXIT_PREEMPTED, EXIT_INTERRUPTED = 75, 130


def add_parser(sub) -> None:
    p = add_command(sub, "distill", "distill registers into a pretrained ViT following a recipe",
                    "Train a student with register tokens to reproduce the teacher's denoised features; writes "
                    "RUN/{recipe.yaml,metrics.jsonl,checkpoints/,export/}.",
                    "example: phreg distill recipes/quickstart.yaml train.epochs=1 output_dir=runs/try. Exit codes: "
                    "0 done, 1 runtime failure (full or read-only disk, ...), 2 bad input, 75 stopped by a signal "
                    "(SIGTERM, SIGUSR1) after writing a checkpoint, 130 Ctrl-C.")
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted recipe overrides, e.g. data.root=DIR model.checkpoint=FILE output_dir=RUN")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir from its newest valid checkpoint (train.epochs / "
                        "train.max_steps may grow to extend a run), or a target cache build that was stopped")
    p.add_argument("--auto-resume", action="store_true",
                   help="resume when output_dir has a checkpoint, else start fresh: the same command for the first "
                        "run and every requeue")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    p.add_argument("--verbose", action="store_true",
                   help="print the unlocked-parameter table whole (always written to RUN/unlocked.txt)")
    p.set_defaults(func=run)


def check(recipe, resuming: bool = False) -> None:
    """The recipe's folders and files and the output folder, before torch is imported. A fresh run refuses an
    output_dir that holds checkpoints here; which checkpoint a resumed run uses is decided (verified) by `distill`."""
    from ..data.scan import kind, scan_images
    from ..data.split import check_val_split
    from ..files.paths import check_out
    from ..models.names import check_architecture, check_model_name
    from ..run.folder import STEP_DIR, used_folder
    from ..run.lock import refuse_if_held
    from ..ttr.sidecar import check_ttr

    m, d = recipe.model, recipe.data
    check_model_name(m.name, m.checkpoint)
    check_ttr(m.teacher_ttr, "model.teacher_ttr")
    if kind(d.root) == "folder":  # datasets and shards are opened by their own libraries, later
        files, _ = scan_images(d.root, "data.root")
        check_val_split(d.val_split, len(files))
    if d.val_root and kind(d.val_root) == "folder":
        scan_images(d.val_root, "data.val_root")
    check_out(recipe.output_dir, "output_dir")
    if int(os.environ.get("RANK", 0)) == 0:  # only the process that will hold the lock probes it
        refuse_if_held(Path(recipe.output_dir).expanduser())
    held = Path(recipe.output_dir).expanduser() / "checkpoints"
    if not resuming and held.is_dir() and any(STEP_DIR.match(p.name) for p in held.iterdir()):
        # the recipe's own mistakes first (a misspelt model.name, a bad model.img_size): a seconds-long timm check,
        # paid only on this path; the folder's state is not what is wrong with such a command
        check_architecture(recipe.model, recipe.views)
        raise used_folder(Path(recipe.output_dir).expanduser())
    if recipe.cache.dir:
        check_out(recipe.cache.dir, "cache.dir")


def run(args) -> int:
    from ..config.recipe import load_recipe

    from ..models.names import timm_name

    recipe = load_recipe(args.recipe, args.overrides)
    recipe.model.name = timm_name(recipe.model.name)  # `dinov2_vits14` is timm's vit_small_patch14_dinov2
    check(recipe, resuming=args.resume or args.auto_resume)  # before torch is even imported
    from ..distill.loop import distill
    from ..errors import Interrupted, Preempted
    from ..run.folder import cache_build_unfinished, cache_folder, latest_checkpoint

    main_process = int(os.environ.get("RANK", 0)) == 0  # one line per launch, not one per process
    again = resume_command(args)
    try:
        out = distill(recipe, resume=args.resume, cpu=args.cpu, quiet=args.quiet, auto_resume=args.auto_resume,
                      verbose=args.verbose)
    except (Preempted, Interrupted) as e:
        if main_process:
            what = f"by {e.signame} while building the target cache, keeping {e.kept}" if e.kept else \
                f"at step {e.step} by {e.signame}, checkpoint {e.checkpoint}"
            print(f"phreg: preempted {what}; resume with: {again}", file=sys.stderr)
        return EXIT_INTERRUPTED if e.signame == "SIGINT" else EXIT_PREEMPTED
    except KeyboardInterrupt:  # a second Ctrl-C: no new checkpoint
        folder = Path(recipe.output_dir)
        last = latest_checkpoint(folder)
        building = cache_build_unfinished(cache_folder(recipe, folder))
        if main_process:
            print("phreg: interrupted" + (f"; the last checkpoint is {last}; resume with: {again}" if last else
                                          f"; the target cache's finished entries are kept; resume with: {again}"
                                          if building else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    if main_process:
        print(f"done: {out / 'export'}")
    return 0


def resume_command(args) -> str:
    """The command that continues this run (the same one when it already says --auto-resume)."""
    words = ["phreg", "distill", args.recipe, *args.overrides]
    words += [w for w, on in (("--auto-resume", args.auto_resume), ("--cpu", args.cpu), ("--quiet", args.quiet)) if on]
    if not args.auto_resume:
        words.append("--resume")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        words[:1] = ["accelerate", "launch", "-m", "phreg"]
    return shlex.join(map(str, words))
