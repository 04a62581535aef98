"""Export size and time by dtype (`export.dtype`, `phreg export --dtype`), random weights, no download.

    python benchmarks/export_dtype.py [--model vit_giant_patch14_dinov2] [--repeats 3] [--dir DIR]

The teacher's random weights are written once to DIR and loaded as a run loads them (`load_teacher`): held in float32,
or with `speed.frozen_dtype: bf16` (the linear layers' weights in bf16, the rest float32); 16 registers are added.
Each export is distill's own (`export_student`: temporary folder, fsync, rename) into DIR, timed wall-clock, the
variants interleaved (this machine's speed drifts by +-10%). Prints each variant's file size and median time.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

from phreg.backbones import add_registers
from phreg.config.recipe import ModelCfg
from phreg.files.atomic import human
from phreg.files.tensorfile import save_file
from phreg.hub.export import export_student
from phreg.models.loading import load_teacher

DTYPES = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)


def random_weights(name: str, path: Path) -> int:
    """A random state dict of timm's `name` (filled on the meta-built shapes: timm's init of a ViT-g takes minutes)."""
    model = timm.create_model(name, pretrained=False, device="meta")
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(t.shape, generator=gen) * 0.02 for k, t in model.state_dict().items()}
    save_file(state, path)
    return model.pretrained_cfg["input_size"][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_giant_patch14_dinov2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="fp32,bf16", help="exported dtypes, comma-separated (fp32, bf16, fp16)")
    p.add_argument("--dir", type=Path, help="where the weights and exports go, kept (default: a temporary folder, "
                   "removed at the end)")
    args = p.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="export_dtype."))
    folder.mkdir(parents=True, exist_ok=True)
    size = random_weights(args.model, folder / "teacher.safetensors")
    cfg = ModelCfg(name=args.model, checkpoint=str(folder / "teacher.safetensors"), img_size=size)
    students = {held: add_registers(load_teacher(cfg, DTYPES[held] if held == "bf16" else None), 16)
                for held in ("fp32", "bf16")}
    (folder / "teacher.safetensors").unlink()
    params = sum(t.numel() for t in students["fp32"].state_dict().values())
    print(f"{args.model}, {params / 1e6:.0f}M parameters + 16 registers, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, exports in {folder}")
    variants = [(held, out) for held in students for out in args.dtypes.split(",")]
    times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    sizes = {}
    for _ in range(args.repeats):
        for held, out in variants:
            path = folder / f"export_{held}_{out}"
            began = time.perf_counter()
            export_student(students[held], path, (0.5,) * 3, (0.5,) * 3, {}, dtype=DTYPES[out])
            times[held, out].append(time.perf_counter() - began)
            sizes[held, out] = (path / "model.safetensors").stat().st_size
    print("| student's frozen weights held in | exported as | model.safetensors | export time (median of "
          f"{args.repeats}) |\n| --- | --- | ---: | ---: |")
    for held, out in variants:
        print(f"| {held} | {out} | {human(sizes[held, out])} | {statistics.median(times[held, out]):.1f} s |")
    if args.dir is None:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
