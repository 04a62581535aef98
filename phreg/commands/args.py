"""What several commands share: the help formatter, argument groups (model, zero-shot, test-time registers), their
cheap checks, and the wiring of `--ttr` onto a loaded model. Torch-free at import: each command imports the heavy
machinery once its arguments have been checked."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from ..errors import UsageError
from ..files.paths import check_file, user_path


class HelpFormatter(argparse.HelpFormatter):
    """Wraps help at spaces only: `--dry-run` and `hf-hub:ID` are never cut at their hyphen."""

    def _split_lines(self, text, width):
        return textwrap.TextWrapper(width, break_on_hyphens=False, break_long_words=False).wrap(
            self._whitespace_matcher.sub(" ", text).strip())

    def _fill_text(self, text, width, indent):
        return textwrap.TextWrapper(width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False,
                                    break_long_words=False).fill(self._whitespace_matcher.sub(" ", text).strip())


def add_command(sub, name: str, help: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A subcommand's parser, formatted as every phreg command is."""
    return sub.add_parser(name, formatter_class=HelpFormatter, help=help, description=description, epilog=epilog)


def device(args) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"


# ------------------------------------------------------------------------------------------------- argument groups

def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--img-size", type=int, help="resolution (default: the run's recipe, the export's, else 224)")
    p.add_argument("--views", type=int, default=10, help="TTA views for the denoised features (default 10)")
    p.add_argument("--limit", type=int, default=0, help="use at most this many images (sorted by path)")
    p.add_argument("--figures", type=int, default=8, help="pictures for the first N images (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the view plans")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")


def ttr_arg(p: argparse.ArgumentParser, more: str = "") -> None:
    p.add_argument("--ttr", metavar="SIDECAR|find", type=user_path,
                   help="apply test-time registers (Jiang et al., 2025): a sidecar written by "
                        "phreg.ttr.save_test_time_registers, or find the register neurons on the first 16 images. "
                        "Stock timm alone does not apply them." + more)


DATASET_CLASSES = "<the dataset's>"  # `eval --classes` without a file: the class names of --dataset


def zeroshot_args(p: argparse.ArgumentParser, classes_required: bool, from_dataset: bool = False) -> None:
    g = p.add_argument_group("zero-shot segmentation (CLIP family; NACLIP / PH-Reg protocol)")
    g.add_argument("--classes", required=classes_required, metavar="FILE",
                   **(dict(nargs="?", const=DATASET_CLASSES) if from_dataset else {}),
                   help="class file: CSV with a name column (id, rgb optional; synonyms split by ';') or "
                        "NACLIP's text format (one class per line, synonyms split by ',')"
                        + ("; without FILE, with --dataset: its class names (NACLIP's)" if from_dataset else ""))
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


# ---------------------------------------------------------------------------------------------------- their checks

def zeroshot_inputs(args, data=None) -> dict:
    """Check the cheap zero-shot inputs (class file, images, masks folder, window) before any model is loaded;
    returns the classes and the segmenter's settings. `data`: eval's `EvalSet` (images and masks checked already;
    a benchmark's classes and ignore value)."""
    if args.classes != DATASET_CLASSES:
        check_file(args.classes, "--classes")  # before the import below (torch)
    from ..clip.segmenter import dataset_classes, read_classes
    from ..data.scan import scan_images

    ignore = data.ignore_index if data is not None else args.ignore_index
    if args.classes == DATASET_CLASSES:
        classes = dataset_classes(data.classes, data.titles)
    else:
        classes = read_classes(args.classes, ignore)
    if data is None:
        scan_images(args.images)  # a missing or empty folder is one line, before any model loads
        if getattr(args, "masks", None) and not Path(args.masks).is_dir():
            raise UsageError(f"--masks {args.masks} is not a folder")
    check_file(args.text, "--text")
    if args.crop and (args.crop > args.short_side or args.stride < 1):
        raise UsageError(f"--crop {args.crop} must be <= --short-side {args.short_side} and --stride >= 1")
    if args.naclip_sigma <= 0 or args.logit_scale <= 0 or not 0 <= args.bg_threshold < 1:
        raise UsageError("--naclip-sigma and --logit-scale must be > 0, --bg-threshold in [0, 1)")
    settings = dict(short_side=args.short_side, crop=args.crop, stride=args.stride, logit_scale=args.logit_scale,
                    background_threshold=args.bg_threshold)
    return dict(classes=classes, settings=settings, sigma=args.naclip_sigma)


# ----------------------------------------------------------------------------------------- test-time registers

def ttr_images(args, loaded, files=None):
    """The first images of --images (or of `files`) at the model's size: what `--ttr find` finds the register
    neurons on."""
    from ..eval.inspection import crops, load_images
    from ..ttr.use import FIND_IMAGES

    if files is not None:
        return lambda: crops(files[:FIND_IMAGES], loaded)
    return lambda: load_images(args.images, loaded, FIND_IMAGES)[1]


def ttr_line(how, neurons) -> str:
    """What a command says of the test-time registers it applied."""
    from ..ttr.neurons import RegisterNeurons

    by_layer = neurons.by_layer() if isinstance(neurons, RegisterNeurons) else neurons
    count = sum(len(u) for u in by_layer.values())
    return (f"test-time registers ({how}): {count} register neurons {by_layer}" if count else
            f"test-time registers ({how}): no register neurons, nothing to move: the model is used as it is")


def with_ttr(args, loaded):
    """`--ttr SIDECAR|find` of inspect and segment: the model with test-time registers (said on stdout)."""
    if args.ttr in (None, "none"):
        return loaded
    from ..ttr.use import with_test_time_registers

    loaded, neurons = with_test_time_registers(loaded, args.ttr, ttr_images(args, loaded))
    print(ttr_line(args.ttr, neurons))
    return loaded
