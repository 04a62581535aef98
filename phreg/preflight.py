"""Everything cheap, checked before anything expensive: a usage mistake is reported in about a second.

Each command first checks what it can without torch or timm (the recipe, folders, files, masks, split, output folder),
then imports the heavy machinery and loads models. Torch-free on purpose: importing torch alone takes seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError
from .folders import kind, scan_images
from .lock import note_if_held, refuse_if_held
from .run import STEP_DIR, used_folder



def user_path(text: str | None) -> str | None:
    """argparse `type=`: `--images=~/photos` (no shell expands `~` after `=`)."""
    return os.path.expanduser(text) if text is not None else None


def check_model_spec(spec: str, what: str = "model") -> None:
    """A run folder, an export folder, a local-dir:/hf-hub: name or a timm name (the name itself is checked later,
    against timm's registry)."""
    path = Path(spec)
    if path.is_dir():
        if (path / "recipe.yaml").is_file() and not (path / "export" / "config.json").is_file():
            raise UsageError(f"{path} is a phreg run without a finished export (run it to the end, or `phreg export`)")
        if not (path / "recipe.yaml").is_file() and not (path / "config.json").is_file():
            raise UsageError(f"{what} {path} is neither a phreg run nor a timm export folder (no config.json)")
        return
    if spec.startswith("local-dir:") and not Path(spec.removeprefix("local-dir:")).is_dir():
        raise UsageError(f"{what} {spec}: no such folder")
    if ":" not in spec and (os.sep in spec or spec.startswith(".")):
        raise UsageError(f"{what} {spec}: no such folder")


MODEL_PREFIXES = ("local-dir", "hf-hub")  # model.name = PREFIX:WHERE; anything else is a timm name


def check_model_name(name: str, checkpoint: str | None = None) -> None:
    """`model.name`'s prefix and `local-dir:` folder, and `model.checkpoint`: what `distill` checks before torch is
    imported and `load_teacher` checks again for every caller that comes without the CLI (tests, benchmarks, ttr)."""
    if ":" in name and name.split(":", 1)[0] not in MODEL_PREFIXES:
        raise UsageError(f"model.name {name!r}: only the prefixes local-dir: and hf-hub: are understood")
    if name.startswith("local-dir:") and not Path(name.removeprefix("local-dir:")).is_dir():
        raise UsageError(f"model.name {name}: no such folder")
    check_file(checkpoint, "model.checkpoint")


def unknown_model(name: str, what: str) -> UsageError:
    """`what 'vit_smal_patch14_dinov2' is not a timm model; closest: vit_small_patch14_dinov2, ...`."""
    import difflib

    import timm

    base = name.split(".")[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else "; see timm.list_models('*vit*')"
    return UsageError(f"{what} {name!r} is not a timm model{hint}")


def check_architecture(cfg) -> None:
    """`model.name` against timm's registry and `model.img_size` against its patch size, on the meta device (no
    weights, no network; timm's import costs seconds): the recipe's own mistakes, said before anything about the
    folder it writes to. What else can be wrong with the model is said by the loader, in its own words."""
    import timm

    check_model_name(cfg.name, cfg.checkpoint)
    if cfg.name.startswith("hf-hub:"):  # its architecture is in a config on the Hub: checked when it loads
        return
    if ":" not in cfg.name and not timm.is_model(cfg.name):
        raise unknown_model(cfg.name, "model.name")
    try:
        model = timm.create_model(cfg.name, pretrained=False, device="meta")
    except Exception:  # a folder timm cannot read, a family phreg does not distill: the loader's words
        return
    if hasattr(model, "patch_embed"):
        check_img_size(model, cfg.img_size)


def check_img_size(model, img_size: int) -> None:
    """The resolution against a built model's patch size (a meta-device model will do: no weights are read)."""
    p = model.patch_embed.patch_size[0]
    if img_size % p:
        lo, hi = (img_size // p) * p, (img_size // p + 1) * p
        raise UsageError(f"model.img_size={img_size} is not a multiple of the patch size {p}; "
                         f"nearest valid sizes: {', '.join(str(s) for s in (lo, hi) if s > 0)}")


def check_val_split(fraction: float, n: int) -> int:
    """How many of `n` images `data.val_split` holds out: round(fraction * n), at least one when fraction > 0, and
    never all of them. Checked here on the folder's scan, and by `data.split_files` on every list it splits."""
    if fraction <= 0:
        return 0
    held = max(1, round(fraction * n))
    if held >= n:
        raise UsageError(f"data.val_split={fraction} leaves no training image out of {n}")
    return held


def check_file(path: str | None, what: str) -> None:
    if path is not None and not Path(path).is_file():
        raise UsageError(f"{what} {path} not found")


def check_out(path: str | Path | None, what: str = "--out") -> None:
    """An output folder: absent (created later) or a folder, and never inside a file."""
    if path is None:
        return
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"{what} {path}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK):
                raise UsageError(f"{what} {path}: {p} is not writable")
            return


def check_images(folder: str, limit: int = 0) -> list[Path]:
    if limit < 0:
        raise UsageError("--limit must be >= 0")
    files, _ = scan_images(folder, "--images")
    return files[:limit] if limit else files


def check_views(views: int) -> int:
    if views < 1:
        raise UsageError("--views must be >= 1")
    return views


def check_ttr(how: str | None, what: str = "--ttr") -> None:
    """Test-time registers named sensibly: none, find, or a sidecar file (or a folder holding one)."""
    if how is None or how in ("none", "find"):
        return
    path = Path(how).expanduser()
    if not (path.is_file() or (path / "test_time_registers.json").is_file()):
        raise UsageError(f"{what}: {how} is neither none, find nor a test-time-register sidecar "
                         "(a .json file or a folder holding test_time_registers.json)")


def check_distill(recipe, resuming: bool = False) -> None:
    """The recipe's folders and files and the output folder, before torch is imported. A fresh run refuses an
    output_dir that holds checkpoints here; which checkpoint a resumed run uses is decided (verified) by `distill`."""
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
        check_architecture(recipe.model)
        raise used_folder(Path(recipe.output_dir).expanduser())
    if recipe.cache.dir:
        check_out(recipe.cache.dir, "cache.dir")


def check_eval(args) -> list[Path]:
    """Models named sensibly, images, masks (ids checked on a sample against --num-classes/--ignore-index), split,
    output folder. Returns the image files."""
    from .eval.inputs import check_masks, split_indices

    if getattr(args, "classes", None) and not args.masks:
        raise UsageError("--classes needs --masks (ground-truth label maps) to score zero-shot segmentation")
    check_views(args.views)
    check_ttr(getattr(args, "ttr", None))
    if args.student is None:
        if not args.teacher or getattr(args, "ttr", None) in (None, "none"):
            raise UsageError("--student is required, unless --teacher and --ttr are given (teacher vs teacher with "
                             "test-time registers)")
        if args.out is None:
            raise UsageError("--out is required without --student")
        if getattr(args, "classes", None):
            raise UsageError("--classes needs --student (zero-shot compares the teacher with a student)")
    else:
        check_model_spec(args.student, "--student")
        note_if_held(args.student, "evaluating its export as it is now (replaced whole when the run finishes)")
    if args.teacher:
        check_model_spec(args.teacher, "--teacher")
    elif not (Path(args.student) / "recipe.yaml").is_file():
        raise UsageError("--teacher is required unless --student is a phreg run folder")
    else:  # the teacher is the run's base model: its weights file must still be where the recipe says
        from .recipe import load_recipe

        checkpoint = load_recipe(Path(args.student) / "recipe.yaml").model.checkpoint
        if checkpoint and not Path(checkpoint).is_file():
            raise UsageError(f"the teacher's weights {checkpoint} (model.checkpoint in {args.student}/recipe.yaml) "
                             "are gone; pass --teacher MODEL --teacher-checkpoint FILE")
    check_file(args.teacher_checkpoint, "--teacher-checkpoint")
    if args.out is None and not (Path(args.student) / "recipe.yaml").is_file():
        raise UsageError("--out is required unless --student is a phreg run folder (default RUN/eval)")
    check_out(args.out)
    files = check_images(args.images, args.limit)
    if args.masks and (args.num_classes is not None or not getattr(args, "classes", None)):
        check_masks(files, args.masks, args.num_classes, args.ignore_index)  # the probe's masks
        split_indices(files, args.split)
    elif not args.masks and (args.num_classes is not None or args.split or args.ignore_index is not None):
        raise UsageError("--num-classes, --ignore-index and --split are for the probe: pass --masks DIR too")
    return files


def check_inspect(args) -> list[Path]:
    check_views(args.views)
    check_ttr(getattr(args, "ttr", None))
    if getattr(args, "top_k", None) is not None and args.top_k < 1:
        raise UsageError("--top-k must be >= 1")
    check_model_spec(args.model)
    note_if_held(args.model, "inspecting its export as it is now (replaced whole when the run finishes)")
    check_file(args.checkpoint, "--checkpoint")
    check_out(args.out)
    return check_images(args.images, args.limit)
