"""`phreg segment MODEL --images DIR --classes FILE --out DIR`: zero-shot segmentation of a folder (CLIP family)."""

from __future__ import annotations

from pathlib import Path

from ..files.paths import user_path
from .args import add_command, device, ttr_arg, with_ttr, zeroshot_args, zeroshot_inputs


def add_parser(sub) -> None:
    p = add_command(sub, "segment", "zero-shot segmentation of a folder of images (CLIP family)",
                    "Label every pixel with one of the classes in a class file, reading the model through a dense "
                    "head and CLIP's text tower. Writes OUT/labels/*.png (label values), OUT/overlays/*.png and "
                    "OUT/classes.json.",
                    "example: phreg segment runs/clip_vitb16 --images DIR --classes classes.csv --out seg/")
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
    ttr_arg(p)
    zeroshot_args(p, classes_required=True)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..clip.segment import check_segment_out, segment_folder
    from ..clip.text import text_tower_for
    from ..data.scan import scan_images
    from ..models.names import timm_name
    from ..models.specs import load_spec
    from ..ttr.sidecar import check_ttr

    check_ttr(args.ttr)
    args.model = timm_name(args.model, "MODEL")
    zs = zeroshot_inputs(args)
    files, _ = scan_images(args.images)
    files = files[:args.limit] if args.limit else files
    out = Path(args.out)
    check_segment_out(out)
    loaded = with_ttr(args, load_spec(args.model, args.img_size, args.checkpoint))
    text = text_tower_for(args.model, args.text, args.text_model, loaded.run)
    s = segment_folder(loaded, files, zs["classes"], text, out, args.head, zs["settings"], zs["sigma"], device(args),
                       say=(lambda *a: None) if args.quiet else print)
    print(f"wrote {s['images']} label maps and overlays to {out} in {s['seconds']}s")
    return 0
