"""`phreg export RUN`: (re)build a run's export folder from its newest checkpoint, for timm or transformers."""

from __future__ import annotations

import time
from pathlib import Path

from ..files.paths import user_path
from .args import add_command


def add_parser(sub) -> None:
    p = add_command(sub, "export", "(re)build a run's export folder from its latest checkpoint",
                    "Write RUN/export/{model.safetensors,config.json} (or --out DIR) from the run's latest "
                    "checkpoint, as distill does at the end. A checkpoint holds what trains: the rest comes from the "
                    "run's base weights, which must be the file it was trained on.")
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
    p.set_defaults(func=run)


def run(args) -> int:
    from ..run.folder import require_run
    from ..run.lock import hold, note_if_held

    require_run(args.run)  # before the lock: never a lock file in a folder that is not a run (or not one yet)
    inside = args.out is None or Path(args.out).resolve().is_relative_to(Path(args.run).resolve())
    if not inside:  # written elsewhere: the run is only read (its newest verified checkpoint, as it is now)
        note_if_held(args.run, "exporting its newest checkpoint as it is now")
        return export(args)
    with hold(args.run, "phreg export"):  # writes into the run folder: one writer at a time
        return export(args)


def export(args) -> int:
    began = time.perf_counter()
    if args.format in ("transformers", "both"):
        from ..hub.transformers import ARCHITECTURE, SUFFIX, export_run_transformers

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
    from ..hub.export import export_run

    out = export_run(args.run, args.out, args.dtype)
    print(f"exported {out} in {time.perf_counter() - began:.1f}s")
    return 0
