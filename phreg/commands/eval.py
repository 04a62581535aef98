"""`phreg eval --student RUN --images DIR`: teacher vs student on the same images, seeds and view plans: artifacts,
denoised distance, the segmentation probe, zero-shot, cost; the terminal table, eval.json, report.html, pictures."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import UsageError
from ..files.paths import user_path
from .args import add_command, device, model_args, ttr_arg, ttr_images, ttr_line, zeroshot_args, zeroshot_inputs


def add_parser(sub) -> None:
    p = add_command(sub, "eval", "teacher vs student: artifacts, denoised distance, probe, cost, report",
                    "Compare a distilled student with its teacher on the same images, seeds and view plans. Writes "
                    "OUT/eval.json, OUT/report.html and PNGs.",
                    "example: phreg eval --student runs/quickstart --images DIR  (teacher and --out default to the "
                    "run's base model and RUN/eval)")
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
    model_args(p)
    zeroshot_args(p, classes_required=False)
    p.add_argument("--teacher-head", default="naclip", choices=("final", "naclip", "maskclip"),
                   help="dense head of the teacher for zero-shot (default naclip)")
    p.add_argument("--student-head", default="maskclip", choices=("final", "naclip", "maskclip"),
                   help="dense head of the student for zero-shot (default maskclip)")
    ttr_arg(p, " With it, eval compares teacher, teacher + test-time registers, student and student + test-time "
               "registers (the teacher's neurons), a column each.")
    p.set_defaults(func=run)


def check(args) -> list[Path]:
    """Models named sensibly, images, masks (ids checked on a sample against --num-classes/--ignore-index), split,
    output folder, before torch is imported. Returns the image files."""
    from ..eval.inputs import check_images, check_masks, check_views, split_indices
    from ..files.paths import check_file, check_out
    from ..models.names import check_model_spec, timm_name
    from ..run.lock import note_if_held
    from ..ttr.sidecar import check_ttr

    if args.classes and not args.masks:
        raise UsageError("--classes needs --masks (ground-truth label maps) to score zero-shot segmentation")
    check_views(args.views)
    check_ttr(args.ttr)
    args.student = args.student and timm_name(args.student, "--student")
    args.teacher = args.teacher and timm_name(args.teacher, "--teacher")
    if args.student is None:
        if not args.teacher or args.ttr in (None, "none"):
            raise UsageError("--student is required, unless --teacher and --ttr are given (teacher vs teacher with "
                             "test-time registers)")
        if args.out is None:
            raise UsageError("--out is required without --student")
        if args.classes:
            raise UsageError("--classes needs --student (zero-shot compares the teacher with a student)")
    else:
        check_model_spec(args.student, "--student")
        note_if_held(args.student, "evaluating its export as it is now (replaced whole when the run finishes)")
    if args.teacher:
        check_model_spec(args.teacher, "--teacher")
    elif not (Path(args.student) / "recipe.yaml").is_file():
        raise UsageError("--teacher is required unless --student is a phreg run folder")
    else:  # the teacher is the run's base model: its weights file must still be where the recipe says
        from ..config.recipe import load_recipe

        checkpoint = load_recipe(Path(args.student) / "recipe.yaml").model.checkpoint
        if checkpoint and not Path(checkpoint).is_file():
            raise UsageError(f"the teacher's weights {checkpoint} (model.checkpoint in {args.student}/recipe.yaml) "
                             "are gone; pass --teacher MODEL --teacher-checkpoint FILE")
    check_file(args.teacher_checkpoint, "--teacher-checkpoint", weights=True)
    if args.out is None and not (Path(args.student) / "recipe.yaml").is_file():
        raise UsageError("--out is required unless --student is a phreg run folder (default RUN/eval)")
    check_out(args.out)
    files = check_images(args.images, args.limit)
    if args.masks and (args.num_classes is not None or not args.classes):
        check_masks(files, args.masks, args.num_classes, args.ignore_index)  # the probe's masks
        split_indices(files, args.split)
    elif not args.masks and (args.num_classes is not None or args.split or args.ignore_index is not None):
        raise UsageError("--num-classes, --ignore-index and --split are for the probe: pass --masks DIR too")
    return files


def run(args) -> int:
    check(args)  # images, masks' class ids, split, output folder: before any model loads
    from ..eval.evaluate import EvalOptions, evaluate
    from ..eval.tables import text_table
    from ..models.specs import load_run_teacher, load_spec
    from ..run.training_list import overlap_line

    began = time.perf_counter()
    zs = zeroshot_inputs(args) if args.classes else None  # cheap checks first, then the models
    student = load_spec(args.student, args.img_size) if args.student else None
    if args.teacher:
        teacher = load_spec(args.teacher, student.img_size if student else args.img_size, args.teacher_checkpoint)
    else:
        teacher = load_run_teacher(student.run, student.img_size)
    others, labels, ttr = with_ttr_columns(args, teacher, student)
    if student is None:  # teacher vs teacher with test-time registers
        student = others.pop("ttr")
        labels = dict(teacher="teacher", student="test-time registers")
    load_s = time.perf_counter() - began
    out = Path(args.out) if args.out else student.run / "eval"
    zeroshot = None
    if zs is not None:
        from ..clip.text import text_tower_for
        from ..eval.zeroshot import ZeroShot

        zeroshot = ZeroShot(text_tower=text_tower_for(args.student, args.text, args.text_model, student.run),
                            heads=(args.teacher_head, args.student_head), **zs)
    options = EvalOptions(views=args.views, limit=args.limit, pictures=args.figures, seed=args.seed, masks=args.masks,
                          num_classes=args.num_classes, ignore_index=args.ignore_index, split=args.split,
                          device=device(args), zeroshot=zeroshot, untrained=args.student is None)
    r = evaluate(student, teacher, args.images, out, options, others or None, labels, ttr)
    print(text_table(r))
    print(overlap_line(r["training_overlap"]))
    stages = ", ".join(f"{k} {v}s" for k, v in r.get("timings", {}).items())
    print(f"wrote {out / 'eval.json'}, {out / 'report.html'} and {len(r['figures'])} pictures in "
          f"{time.perf_counter() - began:.0f}s (loading models {load_s:.1f}s{', ' + stages if stages else ''})")
    return 0


def with_ttr_columns(args, teacher, student) -> tuple[dict, dict | None, dict | None]:
    """`eval --ttr`: the teacher with test-time registers and, with a student, the student with the same neurons
    (found on the teacher, or read from the sidecar). Returns ({key: model}, {key: column label}, record)."""
    if args.ttr in (None, "none"):
        return {}, None, None
    from ..ttr.use import neurons_record, with_test_time_registers

    ttr, neurons = with_test_time_registers(teacher, args.ttr, ttr_images(args, teacher))
    print(ttr_line(args.ttr, neurons))
    others = dict(ttr=ttr)
    if student is not None:
        others["both"] = with_test_time_registers(student, args.ttr, neurons=neurons)[0]
    labels = dict(teacher="teacher", ttr="test-time registers", student="PH-Reg student", both="student + TTR")
    return others, labels, neurons_record(neurons, args.ttr)
