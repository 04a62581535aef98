"""`phreg eval --student RUN --images DIR | --dataset KIND:DIR`: teacher vs student on the same images, seeds and view
plans: artifacts, denoised distance, the segmentation and depth probes, zero-shot, cost; the terminal table,
eval.json, report.html, pictures."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import UsageError
from ..eval.datasets import DEPTH_SCALE, LAYOUTS, MAX_DEPTH, PROBE_STEPS
from ..files.paths import user_path
from .args import DATASET_CLASSES, add_command, device, model_args, ttr_arg, ttr_images, ttr_line, zeroshot_args, \
    zeroshot_inputs



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
    p.add_argument("--images", type=user_path, help="folder of images (recursive); or --dataset")
    p.add_argument("--dataset", metavar="KIND:DIR", help=f"a standard benchmark folder with its official split, "
                   f"classes and label mapping: {', '.join(f'{k}:DIR' for k in LAYOUTS)} (instead of --images, "
                   "--masks, --depth and --split; --limit N takes the first N images of each split)")
    p.add_argument("--masks", type=user_path, help="single-channel integer PNG masks with the images' file stems")
    p.add_argument("--num-classes", type=int, help="classes in the masks (needed with --masks)")
    p.add_argument("--ignore-index", type=int, help="mask value to ignore (e.g. 11 for CamVid's void)")
    p.add_argument("--depth", type=user_path, help="ground-truth depth with the images' file stems: 16-bit PNG "
                                                   "(millimetres), float TIFF or .npy (metres); 0 = no measurement")
    p.add_argument("--depth-scale", type=float, default=DEPTH_SCALE,
                   help="integer depth units per metre (default 1000: millimetres, NYUv2; KITTI: 256)")
    p.add_argument("--max-depth", type=float, default=MAX_DEPTH,
                   help="deepest bin of the depth probe, in metres; deeper pixels are not scored (default 10, "
                        "NYUv2; KITTI: 80)")
    p.add_argument("--split", type=user_path, help="train/val split file (CSV file,split or 'name split' lines); "
                                                   "default: every 4th image is val")
    p.add_argument("--probe-steps", type=int, default=PROBE_STEPS,
                   help=f"training steps of the segmentation and depth probes (default {PROBE_STEPS}; the paper: 40000 "
                        "ADE20K, 20000 VOC, 30000 NYUv2; 0: no probes, e.g. zero-shot alone)")
    p.add_argument("--out", type=user_path, help="output folder (default RUN/eval for a run)")
    model_args(p)
    zeroshot_args(p, classes_required=False, from_dataset=True)
    p.add_argument("--teacher-head", default="naclip", choices=("final", "naclip", "maskclip"),
                   help="dense head of the teacher for zero-shot (default naclip)")
    p.add_argument("--student-head", default="maskclip", choices=("final", "naclip", "maskclip"),
                   help="dense head of the student for zero-shot (default maskclip)")
    ttr_arg(p, " With it, eval compares teacher, teacher + test-time registers, student and student + test-time "
               "registers (the teacher's neurons), a column each.")
    p.set_defaults(func=run)


def check(args):
    """Models named sensibly, the images and their labels (masks' ids checked on a sample against --num-classes /
    --ignore-index, depth maps' format and size, a benchmark folder against its layout), the split and the output
    folder, before torch is imported. Returns the `EvalSet`."""
    from ..eval.inputs import check_views
    from ..ttr.sidecar import check_ttr

    if args.classes and not (args.masks or args.dataset):
        raise UsageError("--classes needs --masks (ground-truth label maps) to score zero-shot segmentation")
    check_views(args.views)
    check_ttr(args.ttr)
    if args.probe_steps < 0:
        raise UsageError("--probe-steps must be >= 0 (0: no probes)")
    check_models(args)
    return eval_set(args)


def check_models(args) -> None:
    from ..files.paths import check_file, check_out
    from ..models.names import check_model_spec, timm_name
    from ..run.lock import note_if_held

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


def eval_set(args):
    """The images, labels and split: a benchmark folder (`--dataset`) or the hand-wired flags."""
    from ..eval.datasets import from_flags, open_dataset

    if args.dataset:
        hand = [f for f, v in (("--images", args.images), ("--masks", args.masks), ("--depth", args.depth),
                               ("--split", args.split), ("--num-classes", args.num_classes),
                               ("--ignore-index", args.ignore_index)) if v is not None]
        if hand:
            raise UsageError(f"--dataset brings its own images, labels and split: leave out {', '.join(hand)}")
        return open_dataset(args.dataset, args.limit)
    if not args.images:
        raise UsageError("pass --images DIR (with --masks / --depth for the probes) or --dataset KIND:DIR")
    if not args.masks and (args.num_classes is not None or args.ignore_index is not None):
        raise UsageError("--num-classes and --ignore-index are for the segmentation probe: pass --masks DIR too")
    if args.split and not (args.masks or args.depth):
        raise UsageError("--split is for the probes: pass --masks DIR or --depth DIR too")
    if args.classes == DATASET_CLASSES:
        raise UsageError("--classes without a file takes its class names from --dataset; pass --classes FILE")
    return from_flags(args.images, args.masks, args.num_classes, args.ignore_index, args.split, args.depth,
                      args.depth_scale, args.max_depth, args.limit, need_masks=not args.classes)


def run(args) -> int:
    data = check(args)  # images, labels, split, output folder: before any model loads
    from ..eval.evaluate import EvalOptions, evaluate
    from ..eval.tables import text_table
    from ..models.specs import load_run_teacher, load_spec
    from ..run.training_list import overlap_line

    began = time.perf_counter()
    zs = zeroshot_inputs(args, data) if args.classes else None  # cheap checks first, then the models
    student = load_spec(args.student, args.img_size) if args.student else None
    if args.teacher:
        teacher = load_spec(args.teacher, student.img_size if student else args.img_size, args.teacher_checkpoint)
    else:
        teacher = load_run_teacher(student.run, student.img_size)
    others, labels, ttr = with_ttr_columns(args, teacher, student, [data.files[i] for i in data.analysed])
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
    options = EvalOptions(views=args.views, limit=args.limit, pictures=args.figures, seed=args.seed,
                          probe_steps=args.probe_steps, device=device(args), zeroshot=zeroshot,
                          untrained=args.student is None)
    r = evaluate(student, teacher, data, out, options, others or None, labels, ttr)
    print(text_table(r))
    print(overlap_line(r["training_overlap"]))
    stages = ", ".join(f"{k} {v}s" for k, v in r.get("timings", {}).items())
    print(f"wrote {out / 'eval.json'}, {out / 'report.html'} and {len(r['figures'])} pictures in "
          f"{time.perf_counter() - began:.0f}s (loading models {load_s:.1f}s{', ' + stages if stages else ''})")
    return 0


def with_ttr_columns(args, teacher, student, files) -> tuple[dict, dict | None, dict | None]:
    """`eval --ttr`: the teacher with test-time registers and, with a student, the student with the same neurons
    (found on the teacher's first `files`, or read from the sidecar). Returns ({key: model}, {key: column label},
    record)."""
    if args.ttr in (None, "none"):
        return {}, None, None
    from ..ttr.use import neurons_record, with_test_time_registers

    ttr, neurons = with_test_time_registers(teacher, args.ttr, ttr_images(args, teacher, files))
    print(ttr_line(args.ttr, neurons))
    others = dict(ttr=ttr)
    if student is not None:
        others["both"] = with_test_time_registers(student, args.ttr, neurons=neurons)[0]
    labels = dict(teacher="teacher", ttr="test-time registers", student="PH-Reg student", both="student + TTR")
    return others, labels, neurons_record(neurons, args.ttr)
