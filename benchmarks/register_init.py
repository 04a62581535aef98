"""Which start for fresh registers moves the teacher's function least? Measured, per candidate.

For each model and each register init candidate (`Backbone.init_candidates`, plus the paper's randn), prints the
step-0 student's mean 1 - cos to the teacher's TTA-denoised patch features, divided by the raw teacher's own
distance to them (1.0 = the student starts exactly where the teacher is; the loss starts from there).

    python benchmarks/register_init.py --images DIR [--dinov2 FILE] [--families deit3,dinov3,...] [--size 224]

Real DINOv2-S (`--dinov2`, 224 px) gives the one real-weights answer here; the other families are depth-2 random
models with shaken weights (`tests/test_backbones.py: reduced`), a structural check only: their attention is not a
trained model's. Without an absolute positional embedding (DINOv3), pos_mean does not exist.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from phreg.backbones import add_registers, backbone, patch_tokens  # noqa: E402
from phreg.data.images import ImageDataset  # noqa: E402
from phreg.data.scan import scan_images
from phreg.targets.heldout import cosine_distance  # noqa: E402
from phreg.targets.teacher import DenoisedTeacher  # noqa: E402
from phreg.config.recipe import ViewsCfg  # noqa: E402


def ratios(teacher, x, mean, std, views: int, registers: int, seeds=(0, 1, 2)) -> dict[str, float]:
    denoiser = DenoisedTeacher(teacher, ViewsCfg(num=views), mean, std)
    plans = torch.stack([denoiser.plan_fn()(rng=np.random.default_rng([0, 0, i])) for i in range(len(x))])
    with torch.no_grad():
        targets = torch.cat([denoiser(a, p) for a, p in zip(x.split(4), plans.split(4))])
        raw = cosine_distance(patch_tokens(teacher, x), targets).mean().item()
        out = {"teacher (raw)": raw}
        for init in [*backbone(teacher).init_candidates(), "randn"]:
            d = [cosine_distance(patch_tokens(add_registers(teacher, registers, init, seed=s), x), targets).mean()
                 for s in seeds]
            out[init] = torch.stack(d).mean().item() / raw
    return out


def load(folder, size, mean, std, limit):
    files, _ = scan_images(folder)
    data = ImageDataset(files[:limit], size, mean, std, train=False)
    return data.images()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True)
    ap.add_argument("--dinov2", help="real DINOv2-S/14 weights (timm safetensors)")
    ap.add_argument("--families", default="deit3,clip,siglip,dinov2_reg4,eva02,dinov3,pe_core")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--registers", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    if args.dinov2:
        from phreg.models.loading import load_teacher
        from phreg.config.recipe import ModelCfg

        t = load_teacher(ModelCfg(name="vit_small_patch14_dinov2", checkpoint=args.dinov2, img_size=args.size))
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        rows.append(("DINOv2-S/14 (real)", ratios(t, load(args.images, args.size, mean, std, args.limit), mean, std,
                                                  args.views, args.registers)))
    if args.families:
        from test_backbones import FAMILIES, reduced

        for key in args.families.split(","):
            name, _, _ = FAMILIES[key]
            patch = 14 if "patch14" in name else 16
            size = args.size // patch * patch
            t = reduced(key, size)
            mean, std = (0.5,) * 3, (0.5,) * 3
            rows.append((f"{key} (random, depth 2)", ratios(t, load(args.images, size, mean, std, args.limit),
                                                            mean, std, args.views, args.registers)))
    cols = ["teacher (raw)", "pos_mean", "class_token", "register_mean", "grey_patch", "zeros", "randn"]
    print(f"{'model':<28}" + "".join(f"{c:>15}" for c in cols))
    for name, r in rows:
        print(f"{name:<28}" + "".join(f"{r[c]:>15.4f}" if c in r else f"{'-':>15}" for c in cols))


if __name__ == "__main__":
    main()
