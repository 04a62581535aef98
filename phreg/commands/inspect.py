"""`phreg inspect MODEL --images DIR`: does this checkpoint need registers? Token norms, high-norm outliers, TTA noise
and pictures for one model; `--neurons` finds its register neurons instead."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import UsageError
from ..files.paths import user_path
from .args import add_command, device, model_args, ttr_arg, with_ttr


def add_parser(sub) -> None:
    p = add_command(sub, "inspect", "token norms, high-norm outliers, TTA noise and pictures for one model",
                    "Does this checkpoint need registers? Writes OUT/inspect.json and PNGs.",
                    "MODEL: a timm name (weights looked up as for distill), local-dir:DIR, hf-hub:ID, a timm export "
                    "folder, or a phreg run folder")
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
    ttr_arg(p)
    model_args(p)
    p.set_defaults(func=run)


def check(args) -> list[Path]:
    """The arguments, the model's name or folder, the images and the output folder, before torch is imported."""
    from ..eval.inputs import check_images, check_views
    from ..files.paths import check_file, check_out
    from ..models.names import check_model_spec, timm_name
    from ..run.lock import note_if_held
    from ..ttr.sidecar import check_ttr

    check_views(args.views)
    check_ttr(args.ttr)
    if args.top_k is not None and args.top_k < 1:
        raise UsageError("--top-k must be >= 1")
    args.model = timm_name(args.model, "MODEL")
    check_model_spec(args.model)
    note_if_held(args.model, "inspecting its export as it is now (replaced whole when the run finishes)")
    check_file(args.checkpoint, "--checkpoint", weights=True)
    check_out(args.out)
    return check_images(args.images, args.limit)


def run(args) -> int:
    check(args)
    from ..eval.inspection import inspect_model, text_summary
    from ..models.specs import load_spec

    began = time.perf_counter()
    loaded = load_spec(args.model, args.img_size, args.checkpoint)
    load_s = time.perf_counter() - began
    out = Path(args.out) if args.out else None
    if args.neurons:
        return neurons(args, loaded, out, began)
    loaded = with_ttr(args, loaded)
    summary = inspect_model(loaded, args.images, out, args.views, args.limit, args.figures, args.seed, device(args))
    print(text_summary(summary))
    what = f"wrote {out / 'inspect.json'} and {len(summary['figures'])} pictures" if out else "inspected"
    print(f"{what} in {time.perf_counter() - began:.1f}s (loading the model {load_s:.1f}s, "
          f"{summary['images']} images {summary['seconds']}s)")
    return 0


def neurons(args, loaded, out: Path | None, began: float) -> int:
    """`inspect --neurons`: the register neurons, their table, pictures and a sidecar."""
    from ..config.recipe import ModelCfg
    from ..eval.neuron_report import inspect_neurons

    spec = Path(args.model)  # the sidecar names the base model as load_spec resolved it
    name = f"local-dir:{spec / 'export' if loaded.run else spec}" if spec.is_dir() else args.model
    base = ModelCfg(name=name, checkpoint=args.checkpoint, img_size=loaded.img_size, mean=list(loaded.mean),
                    std=list(loaded.std))
    r = inspect_neurons(loaded, args.images, out, args.limit, args.figures, device(args), base, tails=args.tails,
                        top_k=args.top_k)
    print(r["table"])
    what = f"wrote {out / 'neurons.json'} and {len(r['figures'])} pictures" if out else "searched"
    if r.get("sidecar"):
        what += f"; the sidecar {out / r['sidecar']} (use it with --ttr {out})"
    print(f"{what} in {time.perf_counter() - began:.1f}s ({len(r['files'])} images)")
    return 0
