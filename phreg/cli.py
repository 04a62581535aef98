"""`phreg` command line. User mistakes are one line on stderr and exit code 2; no tracebacks."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import textwrap
import time
import warnings
from pathlib import Path

from . import __version__
from .errors import Aborted, DiskError, UsageError
from .files import DISK_ERRNOS
from .preflight import user_path

# Exit codes of `phreg distill` besides 0 (done), 1 (runtime failure) and 2 (usage): stopped on a signal after
# writing a checkpoint; 75 is sysexits' EX_TEMPFAIL ("try again later"), 130 the shell's code for Ctrl-C.
EXIT_PREEMPTED, EXIT_INTERRUPTED = 75, 130


def _distill(args) -> int:
    from .preflight import check_distill
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    check_distill(recipe, resuming=args.resume or args.auto_resume)  # before torch is even imported
    from .distill.loop import distill
    from .distill.preempt import Interrupted, Preempted
    from .run import cache_build_unfinished, cache_folder, latest_checkpoint

    main_process = int(os.environ.get("RANK", 0)) == 0  # one line per launch, not one per process
    again = _resume_command(args)
    try:
        run = distill(recipe, resume=args.resume, cpu=args.cpu, quiet=args.quiet, auto_resume=args.auto_resume,
                      verbose=args.verbose)
    except (Preempted, Interrupted) as e:
        if main_process:
            what = f"by {e.signame} while building the target cache, keeping {e.kept}" if e.kept else \
                f"at step {e.step} by {e.signame}, checkpoint {e.checkpoint}"
            print(f"phreg: preempted {what}; resume with: {again}", file=sys.stderr)
        return EXIT_INTERRUPTED if e.signame == "SIGINT" else EXIT_PREEMPTED
    except KeyboardInterrupt:  # a second Ctrl-C: no new checkpoint
        run = Path(recipe.output_dir)
        last = latest_checkpoint(run)
        building = cache_build_unfinished(cache_folder(recipe, run))
        if main_process:
            print("phreg: interrupted" + (f"; the last checkpoint is {last}; resume with: {again}" if last else
                                          f"; the target cache's finished entries are kept; resume with: {again}"
                                          if building else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    if main_process:
        print(f"done: {run / 'export'}")
    return 0


def _resume_command(args) -> str:
    """The command that continues this run (the same one when it already says --auto-resume)."""
    words = ["phreg", "distill", args.recipe, *args.overrides]
    words += [w for w, on in (("--auto-resume", args.auto_resume), ("--cpu", args.cpu), ("--quiet", args.quiet)) if on]
    if not args.auto_resume:
        words.append("--resume")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        words[:1] = ["accelerate", "launch", "-m", "phreg"]
    return shlex.join(map(str, words))


def _inspect(args) -> int:
    from .preflight import check_inspect

    check_inspect(args)
    from .eval.inspection import inspect_model, text_summary
    from .models import load_spec

    began = time.perf_counter()
    loaded = load_spec(args.model, args.img_size, args.checkpoint)
    load_s = time.perf_counter() - began
    out = Path(args.out) if args.out else None
    if args.neurons:
        from .eval.neurons import inspect_neurons

        from .recipe import ModelCfg

        spec = Path(args.model)  # the sidecar names the base model as load_spec resolved it
        name = f"local-dir:{spec / 'export' if loaded.run else spec}" if spec.is_dir() else args.model
        base = ModelCfg(name=name, checkpoint=args.checkpoint, img_size=loaded.img_size, mean=list(loaded.mean),
                        std=list(loaded.std))
        r = inspect_neurons(loaded, args.images, out, args.limit, args.figures, _device(args), base, tails=args.tails,
                            top_k=args.top_k)
        print(r["table"])
        what = f"wrote {out / 'neurons.json'} and {len(r['figures'])} pictures" if out else "searched"
        if r.get("sidecar"):
            what += f"; the sidecar {out / r['sidecar']} (use it with --ttr {out})"
        print(f"{what} in {time.perf_counter() - began:.1f}s ({len(r['files'])} images)")
        return 0
    loaded = _with_ttr(args, loaded)
    summary = inspect_model(loaded, args.images, out, args.views, args.limit, args.figures, args.seed,
                            _device(args))
    print(text_summary(summary))
    what = f"wrote {out / 'inspect.json'} and {len(summary['figures'])} pictures" if out else "inspected"
    print(f"{what} in {time.perf_counter() - began:.1f}s (loading the model {load_s:.1f}s, "
          f"{summary['images']} images {summary['seconds']}s)")
    return 0


def _eval(args) -> int:
    from .preflight import check_eval

    check_eval(args)  # images, masks' class ids, split, output folder: before any model loads
    from .eval.evaluate import EvalOptions, evaluate
    from .models import load_run_teacher, load_spec
    from .tables import cell, columns, number

    began = time.perf_counter()
    zs = _zeroshot_inputs(args) if args.classes else None  # cheap checks first, then the models
    student = load_spec(args.student, args.img_size) if args.student else None
    if args.teacher:
        teacher = load_spec(args.teacher, student.img_size if student else args.img_size, args.teacher_checkpoint)
    else:
        teacher = load_run_teacher(student.run, student.img_size)
    others, labels, ttr = _eval_ttr(args, teacher, student)
    if student is None:  # teacher vs teacher with test-time registers
        student = others.pop("ttr")
        labels = dict(teacher="teacher", student="test-time registers")
    load_s = time.perf_counter() - began
    out = Path(args.out) if args.out else student.run / "eval"
    zeroshot = None
    if zs is not None:
        from .clip.text import text_tower_for
        from .eval.zeroshot import ZeroShot

        zeroshot = ZeroShot(text_tower=text_tower_for(args.student, args.text, args.text_model, student.run),
                            heads=(args.teacher_head, args.student_head), **zs)
    options = EvalOptions(views=args.views, limit=args.limit, pictures=args.figures, seed=args.seed, masks=args.masks,
                          num_classes=args.num_classes, ignore_index=args.ignore_index, split=args.split,
                          device=_device(args), zeroshot=zeroshot)
    r = evaluate(student, teacher, args.images, out, options, others or None, labels, ttr)
    cols = columns(r)
    w = max([52] + [len(row["label"]) + 2 for row in r["summary"]])  # labels say which images a row is on
    width = 21 if len(cols) > 2 else 12
    print(f"{'metric':<{w}}" + "".join(f"{label[:20]:>21}" if len(cols) > 2 else f"{label:>12}" for _, label in cols)
          + "  better")
    for row in r["summary"]:
        verdict = row["better"] or row.get("note") or ""
        print(f"{row['label']:<{w}}" + "".join(f"{number(cell(row, k), '-'):>{width}}" for k, _ in cols)
              + f"  {verdict}")
    from .training_list import overlap_line

    print(overlap_line(r["training_overlap"]))
    stages = ", ".join(f"{k} {v}s" for k, v in r.get("timings", {}).items())
    print(f"wrote {out / 'eval.json'}, {out / 'report.html'} and {len(r['figures'])} pictures in "
          f"{time.perf_counter() - began:.0f}s (loading models {load_s:.1f}s{', ' + stages if stages else ''})")
    return 0


def _ttr_images(args, loaded):
    """The first images of --images at the model's size: what `--ttr find` finds the register neurons on."""
    from .eval.inspection import load_images
    from .ttr.use import FIND_IMAGES

    return lambda: load_images(args.images, loaded, FIND_IMAGES)[1]


def _with_ttr(args, loaded):
    """`--ttr SIDECAR|find` of inspect and segment: the model with test-time registers (said on stdout)."""
    if args.ttr in (None, "none"):
        return loaded
    from .ttr import with_test_time_registers

    loaded, neurons = with_test_time_registers(loaded, args.ttr, _ttr_images(args, loaded))
    print(_ttr_line(args.ttr, neurons))
    return loaded


def _ttr_line(how, neurons) -> str:
    from .ttr import RegisterNeurons

    by_layer = neurons.by_layer() if isinstance(neurons, RegisterNeurons) else neurons
    count = sum(len(u) for u in by_layer.values())
    return (f"test-time registers ({how}): {count} register neurons {by_layer}" if count else
            f"test-time registers ({how}): no register neurons, nothing to move: the model is used as it is")


def _eval_ttr(args, teacher, student) -> tuple[dict, dict | None, dict | None]:
    """`eval --ttr`: the teacher with test-time registers and, with a student, the student with the same neurons
    (found on the teacher, or read from the sidecar). Returns ({key: model}, {key: column label}, record)."""
    if args.ttr in (None, "none"):
        return {}, None, None
    from .ttr import with_test_time_registers
    from .ttr.use import neurons_record

    ttr, neurons = with_test_time_registers(teacher, args.ttr, _ttr_images(args, teacher))
    print(_ttr_line(args.ttr, neurons))
    others = dict(ttr=ttr)
    if student is not None:
        others["both"] = with_test_time_registers(student, args.ttr, neurons=neurons)[0]
    labels = dict(teacher="teacher", ttr="test-time registers", student="PH-Reg student", both="student + TTR")
    return others, labels, neurons_record(neurons, args.ttr)


def _zeroshot_inputs(args) -> dict:
    """Check the cheap zero-shot inputs (class file, masks, window) before any model is loaded."""
    if getattr(args, "masks", "") is None:
        raise UsageError("--classes needs --masks (ground-truth label maps) to score zero-shot segmentation")
    if not Path(args.classes).is_file():  # before the import below (torch)
        raise UsageError(f"--classes {args.classes} not found")
    from .clip.zeroshot import read_classes

    classes = read_classes(args.classes, args.ignore_index)
    from .data import scan_images

    scan_images(args.images)  # a missing or empty folder is one line, before any model loads
    if getattr(args, "masks", None) and not Path(args.masks).is_dir():
        raise UsageError(f"--masks {args.masks} is not a folder")
    if args.text and not Path(args.text).is_file():
        raise UsageError(f"--text {args.text} not found")
    if args.crop and (args.crop > args.short_side or args.stride < 1):
        raise UsageError(f"--crop {args.crop} must be <= --short-side {args.short_side} and --stride >= 1")
    if args.naclip_sigma <= 0 or args.logit_scale <= 0 or not 0 <= args.bg_threshold < 1:
        raise UsageError("--naclip-sigma and --logit-scale must be > 0, --bg-threshold in [0, 1)")
    settings = dict(short_side=args.short_side, crop=args.crop, stride=args.stride, logit_scale=args.logit_scale,
                    background_threshold=args.bg_threshold)
    return dict(classes=classes, settings=settings, sigma=args.naclip_sigma)


def _segment(args) -> int:
    from .clip.run import check_out, segment_folder
    from .clip.text import text_tower_for
    from .data import scan_images
    from .models import load_spec

    from .preflight import check_ttr

    check_ttr(args.ttr)
    zs = _zeroshot_inputs(args)
    files, _ = scan_images(args.images)
    files = files[:args.limit] if args.limit else files
    out = Path(args.out)
    check_out(out)
    loaded = _with_ttr(args, load_spec(args.model, args.img_size, args.checkpoint))
    text = text_tower_for(args.model, args.text, args.text_model, loaded.run)
    s = segment_folder(loaded, files, zs["classes"], text, out, args.head, zs["settings"], zs["sigma"], _device(args),
                       say=(lambda *a: None) if args.quiet else print)
    print(f"wrote {s['images']} label maps and overlays to {out} in {s['seconds']}s")
    return 0


def _zeroshot_args(p: argparse.ArgumentParser, classes_required: bool) -> None:
    g = p.add_argument_group("zero-shot segmentation (CLIP family; NACLIP / PH-Reg protocol)")
    g.add_argument("--classes", required=classes_required, metavar="FILE",
                   help="class file: CSV with a name column (id, rgb optional; synonyms split by ';') or "
                        "NACLIP's text format (one class per line, synonyms split by ',')")
    g.add_argument("--text", metavar="FILE", help="text tower: a saved open_clip_text.safetensors or a whole CLIP "
                                                  "checkpoint (default: the one shipped with the model / run)")
    g.add_argument("--text-model", metavar="NAME", help="open_clip model name of --text (e.g. ViT-B-16-quickgelu)")
    g.add_argument("--short-side", type=int, default=448, help="resize images to this short side (default 448)")
    g.add_argument("--crop", type=int, default=336, help="sliding-window size, 0 = whole image (default 336)")
    g.add_argument("--stride", type=int, default=112, help="sliding-window stride (default 112)")
    g.add_argument("--logit-scale", type=float, default=40.0, help="softmax temperature on cosines (NACLIP: 40)")
    g.add_argument("--bg-threshold", type=float, default=0.0,
                   help="pixels whose best class probability is below this go to the first class (e.g. 0.1 for VOC21)")
    g.add_argument("--naclip-sigma", type=float, default=5.0, help="NACLIP neighbourhood width in patches")


def _ttr_arg(p: argparse.ArgumentParser, more: str = "") -> None:
    p.add_argument("--ttr", metavar="SIDECAR|find", type=user_path,
                   help="apply test-time registers (Jiang et al., 2025): a sidecar written by "
                        "phreg.ttr.save_test_time_registers, or find the register neurons on the first 16 images. "
                        "Stock timm alone does not apply them." + more)


def _device(args) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--img-size", type=int, help="resolution (default: the run's recipe, the export's, else 224)")
    p.add_argument("--views", type=int, default=10, help="TTA views for the denoised features (default 10)")
    p.add_argument("--limit", type=int, default=0, help="use at most this many images (sorted by path)")
    p.add_argument("--figures", type=int, default=8, help="pictures for the first N images (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the view plans")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")


def _estimate(args) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from .distill.memory import plan

    est = plan(recipe, gpu=not args.cpu)
    print(est.line())
    if args.budget:
        fits = est.total <= args.budget * 1e9
        print(f"{'fits' if fits else 'does not fit'} in {args.budget:g} GB"
              + ("" if fits or recipe.speed.grad_checkpointing else "; try speed.grad_checkpointing=true"))
        return 0 if fits else 1
    return 0


def _export(args) -> int:
    from .lock import hold, note_if_held

    inside = args.out is None or Path(args.out).resolve().is_relative_to(Path(args.run).resolve())
    if not inside:  # written elsewhere: the run is only read (its newest verified checkpoint, as it is now)
        note_if_held(args.run, "exporting its newest checkpoint as it is now")
        return _export_to(args)
    from .run import require_run

    require_run(args.run)  # before the lock: never a lock file in a folder that is not a run
    with hold(args.run, "phreg export"):  # writes into the run folder: one writer at a time
        return _export_to(args)


def _export_to(args) -> int:
    began = time.perf_counter()
    if args.format in ("transformers", "both"):
        from .hub.transformers import ARCHITECTURE, SUFFIX, export_run_transformers

        if args.format == "both":  # DIR (timm) and DIR-transformers
            timm_out = Path(args.out) if args.out else Path(args.run) / "export"
            out, check = export_run_transformers(args.run, timm_out.with_name(timm_out.name + SUFFIX), timm_out,
                                                 dtype=args.dtype)
            print(f"exported {timm_out} (timm)")
        else:
            out, check = export_run_transformers(args.run, args.out, dtype=args.dtype)
        print(f"exported {out} in {time.perf_counter() - began:.1f}s: transformers {ARCHITECTURE}, "
              f"{check['registers']} registers; last_hidden_state = timm forward_features to max |diff| "
              f"{check['max_diff']:.1e} at {check['img_size']} px")
        return 0
    from .hub.export import export_run

    out = export_run(args.run, args.out, args.dtype)
    print(f"exported {out} in {time.perf_counter() - began:.1f}s")
    return 0


def _push(args) -> int:
    from .hub.publish import PushError, check_repo_id, dry_run, push
    from .lock import refuse_if_held

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


class HelpFormatter(argparse.HelpFormatter):
    """Wraps help at spaces only: `--dry-run` and `hf-hub:ID` are never cut at their hyphen."""

    def _split_lines(self, text, width):
        return textwrap.TextWrapper(width, break_on_hyphens=False, break_long_words=False).wrap(
            self._whitespace_matcher.sub(" ", text).strip())

    def _fill_text(self, text, width, indent):
        return textwrap.TextWrapper(width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False,
                                    break_long_words=False).fill(self._whitespace_matcher.sub(" ", text).strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phreg", description="Give a pretrained Vision Transformer register tokens after the fact (PH-Reg).",
        formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"phreg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("distill", formatter_class=HelpFormatter, help="distill registers into a pretrained ViT following a recipe",
                       description="Train a student with register tokens to reproduce the teacher's denoised "
                                   "features; writes RUN/{recipe.yaml,metrics.jsonl,checkpoints/,export/}.",
                       epilog="example: phreg distill recipes/quickstart.yaml train.epochs=1 output_dir=runs/try. "
                              "Exit codes: 0 done, 1 runtime failure (full or read-only disk, ...), 2 bad input, "
                              "75 stopped by a signal (SIGTERM, SIGUSR1) after writing a checkpoint, 130 Ctrl-C.")
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted recipe overrides, e.g. data.root=DIR model.checkpoint=FILE output_dir=RUN")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir from its newest valid checkpoint (train.epochs / "
                        "train.max_steps may grow to extend a run)")
    p.add_argument("--auto-resume", action="store_true",
                   help="resume when output_dir has a checkpoint, else start fresh: the same command for the first "
                        "run and every requeue")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    p.add_argument("--verbose", action="store_true",
                   help="print the unlocked-parameter table whole (always written to RUN/unlocked.txt)")
    p.set_defaults(func=_distill)

    p = sub.add_parser("estimate", formatter_class=HelpFormatter, help="the memory a recipe's run will need, without weights",
                       description="Build the recipe's model on the meta device (no weights read, nothing allocated) "
                                   "and print the memory estimate `distill` prints at start: weights, unlocked copies, "
                                   "optimizer, activations, teacher views.",
                       epilog="example: phreg estimate recipes/dinov3_vit7b16.yaml --budget 80. Exit code 1 when "
                              "it does not fit in --budget GB.")
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe overrides, as for distill")
    p.add_argument("--cpu", action="store_true", help="a CPU run (fp32 unless train.precision says bf16); default: a "
                                                      "GPU run (bf16 autocast)")
    p.add_argument("--budget", type=float, metavar="GB", help="say whether the estimate fits in this many GB")
    p.set_defaults(func=_estimate)

    p = sub.add_parser("inspect", formatter_class=HelpFormatter, help="token norms, high-norm outliers, TTA noise and pictures for one model",
                       description="Does this checkpoint need registers? Writes OUT/inspect.json and PNGs.",
                       epilog="MODEL: a timm name (weights looked up as for distill), local-dir:DIR, hf-hub:ID, "
                              "a timm export folder, or a phreg run folder")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--images", required=True, type=user_path, help="folder of images (recursive)")
    p.add_argument("--out", type=user_path, help="folder for inspect.json and pictures (default: print only)")
    p.add_argument("--checkpoint", type=user_path, help="weights file for a timm model name")
    p.add_argument("--neurons", action="store_true",
                   help="find the model's register neurons instead (Jiang et al., 2025): print them (block, unit, "
                        "mean |activation| at outliers vs elsewhere, share of outliers) and, with --out, "
                        "neurons.json and a picture per image of where they fire next to the patch-norm map")
    p.add_argument("--tails", default="both", choices=("both", "high", "low"),
                   help="--neurons: which tails of the norm distribution are outliers (default both)")
    p.add_argument("--top-k", type=int, help="--neurons: keep exactly this many neurons (default: the gap rule)")
    _ttr_arg(p)
    _model_args(p)
    p.set_defaults(func=_inspect)

    p = sub.add_parser("eval", formatter_class=HelpFormatter, help="teacher vs student: artifacts, denoised distance, probe, cost, report",
                       description="Compare a distilled student with its teacher on the same images, seeds and "
                                   "view plans. Writes OUT/eval.json, OUT/report.html and PNGs.",
                       epilog="example: phreg eval --student runs/quickstart --images DIR  (teacher and --out "
                              "default to the run's base model and RUN/eval)")
    p.add_argument("--student", type=user_path, help="a phreg run or export folder, local-dir:/hf-hub:, ... "
                                                     "(may be left out with --teacher and --ttr)")
    p.add_argument("--teacher", help="default: the run's base model and weights, from its recipe")
    p.add_argument("--teacher-checkpoint", type=user_path, help="weights file when --teacher is a timm model name")
    p.add_argument("--images", required=True, type=user_path, help="folder of images (recursive)")
    p.add_argument("--masks", type=user_path, help="single-channel integer PNG masks with the images' file stems")
    p.add_argument("--num-classes", type=int, help="classes in the masks (needed with --masks)")
    p.add_argument("--ignore-index", type=int, help="mask value to ignore (e.g. 11 for CamVid's void)")
    p.add_argument("--split", type=user_path, help="train/val split file (CSV file,split or 'name split' lines); "
                                   "default: every 4th image is val")
    p.add_argument("--out", type=user_path, help="output folder (default RUN/eval for a run)")
    _model_args(p)
    _zeroshot_args(p, classes_required=False)
    p.add_argument("--teacher-head", default="naclip", choices=("final", "naclip", "maskclip"),
                   help="dense head of the teacher for zero-shot (default naclip)")
    p.add_argument("--student-head", default="maskclip", choices=("final", "naclip", "maskclip"),
                   help="dense head of the student for zero-shot (default maskclip)")
    _ttr_arg(p, " With it, eval compares teacher, teacher + test-time registers, student and student + test-time "
                "registers (the teacher's neurons), a column each.")
    p.set_defaults(func=_eval)

    p = sub.add_parser("segment", formatter_class=HelpFormatter, help="zero-shot segmentation of a folder of images (CLIP family)",
                       description="Label every pixel with one of the classes in a class file, reading the model "
                                   "through a dense head and CLIP's text tower. Writes OUT/labels/*.png (label "
                                   "values), OUT/overlays/*.png and OUT/classes.json.",
                       epilog="example: phreg segment runs/clip_vitb16 --images DIR --classes classes.csv --out seg/")
    p.add_argument("model", metavar="MODEL", help="a phreg run or export folder, local-dir:/hf-hub:, a timm name")
    p.add_argument("--images", required=True, type=user_path, help="folder of images (recursive)")
    p.add_argument("--out", required=True, type=user_path, help="output folder (replaced whole)")
    p.add_argument("--checkpoint", type=user_path, help="weights file for a timm model name")
    p.add_argument("--head", default="maskclip", choices=("final", "naclip", "maskclip"),
                   help="dense head (default maskclip: what a PH-Reg CLIP student is trained on)")
    p.add_argument("--ignore-index", type=int, help="class id in the class file not to query (e.g. a void class)")
    p.add_argument("--img-size", type=int, help="model resolution (default: the run's recipe, the export's, else 224)")
    p.add_argument("--limit", type=int, default=0, help="use at most this many images (sorted by path)")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    p.add_argument("--quiet", action="store_true", help="no per-image lines")
    _ttr_arg(p)
    _zeroshot_args(p, classes_required=True)
    p.set_defaults(func=_segment)

    p = sub.add_parser("export", formatter_class=HelpFormatter, help="(re)build a run's export folder from its latest checkpoint",
                       description="Write RUN/export/{model.safetensors,config.json} (or --out DIR) from the run's "
                                   "latest checkpoint, as distill does at the end; the teacher's weights are not needed.")
    p.add_argument("run", type=user_path, help="run folder (output_dir of phreg distill)")
    p.add_argument("--out", type=user_path, metavar="DIR", help="where to write the export (default: RUN/export, "
                   "RUN/export-transformers for --format transformers), replaced atomically")
    p.add_argument("--format", default="timm", choices=("timm", "transformers", "both"),
                   help="timm (default): timm's Hub layout; transformers: a folder AutoModel.from_pretrained loads as "
                        "Dinov2WithRegistersModel, with its image-processor config (DINOv2 family; needs "
                        "pip install 'phreg[transformers]'); both: DIR and DIR-transformers")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"),
                   help="the weights' dtype (default: the recipe's export.dtype; auto: speed.frozen_dtype, fp32 or "
                        "bf16); fp16 is refused for values beyond its range")
    p.set_defaults(func=_export)

    p = sub.add_parser("push", formatter_class=HelpFormatter, help="upload a finished run to the Hugging Face Hub (model card included)",
                       description="Upload RUN/export with its recipe.yaml, a model card README.md and, when RUN/eval "
                                   "has a report, its table and first figure, as one commit. The token comes from "
                                   "HF_TOKEN or the cached login (`hf auth login`); HF_ENDPOINT picks another Hub.",
                       epilog="example: phreg push runs/quickstart --repo-id alice/dinov2-small-reg16 --dry-run hub/")
    p.add_argument("run", type=user_path, help="run folder with a finished export/")
    p.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="model repository, created if missing")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its own)")
    p.add_argument("--revision", metavar="BRANCH", help="commit to this branch, created if missing (default: main)")
    p.add_argument("--commit-message", metavar="MSG", help="default: phreg VERSION: TEACHER + R registers, N steps")
    p.add_argument("--dry-run", type=user_path, metavar="DIR", help="write the exact upload folder to DIR and upload nothing")
    p.add_argument("--tries", type=int, default=4, metavar="N", help="attempts per Hub call on network errors, 429 and 5xx")
    p.add_argument("--retry-wait", type=float, default=2.0, metavar="S", help="first wait between tries, doubling")
    p.add_argument("--format", default="timm", choices=("timm", "transformers", "both"),
                   help="timm (default); transformers: Dinov2WithRegistersModel in its place (DINOv2 family); both: "
                        "timm's at the root, transformers' in transformers/ (the card shows how to load each)")
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
    try:
        return args.func(args)
    except UsageError as e:
        print(f"phreg: error: {e}", file=sys.stderr)
        return 2
    except Aborted as e:
        print(f"phreg: aborted: {e}", file=sys.stderr)
        return 1
    except DiskError as e:
        print(f"phreg: error: {e}", file=sys.stderr)
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
