"""A SYNTHETIC depth ground truth for the CamVid frames, for measuring `phreg eval --depth` where no real depth exists.

CamVid has no depth. This script writes, for every mask in a CamVid-style folder (11 SegNet classes, 11 = void), a
16-bit PNG in millimetres, as NYUv2 ships depth, computed from the class map and the pixel row only:

    depth(y, x) = BASE[class] * (1.5 - y / H)     metres; sky and void: 0 (no measurement, never scored)

so the road and pavement are near (3 m at mid-image, 1.5 m at the bottom), buildings far (6 m at mid-image), and each
class gets nearer towards the bottom of the frame. A probe can only predict it from what the features carry about the
class of a pixel and where it is in the window; it is a test of the probe, not a claim about real depth.

    python benchmarks/camvid_depth.py --masks ../shared/assets/images/camvid_subset/masks --out /tmp/camvid_depth \
        --split ../shared/assets/images/camvid_subset/manifest.csv

With `--split`, it also prints what a probe that sees nothing scores: the train images' median depth everywhere, on
the val images, with the metrics `phreg eval` reports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

# SegNet CamVid ids: 0 Sky, 1 Building, 2 Pole, 3 Road, 4 Pavement, 5 Tree, 6 SignSymbol, 7 Fence, 8 Car,
# 9 Pedestrian, 10 Bicyclist, 11 Unlabelled
BASE = np.array([0.0, 6.0, 5.0, 3.0, 3.0, 5.5, 5.0, 4.0, 4.0, 4.0, 4.0, 0.0])  # metres at mid-image; 0: unmeasured


def synthetic_depth(labels: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W) uint16 depth in millimetres (0 where the class has no depth)."""
    h = labels.shape[0]
    rows = 1.5 - np.arange(h, dtype=np.float64)[:, None] / h
    metres = BASE[np.clip(labels, 0, len(BASE) - 1)] * rows
    return np.round(metres * 1000).astype(np.uint16)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--masks", required=True, type=Path, help="CamVid masks (single-channel PNG, ids 0..11)")
    p.add_argument("--out", required=True, type=Path, help="folder for the depth PNGs (same file names)")
    p.add_argument("--split", type=Path, help="manifest.csv (file,split): print the constant-depth baseline on val")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    masks = sorted(args.masks.glob("*.png"))
    for mask in masks:
        depth = synthetic_depth(np.array(Image.open(mask)).astype(np.int64))
        tmp = args.out / f".{mask.name}.tmp"
        Image.fromarray(depth).save(tmp, format="PNG")
        tmp.replace(args.out / mask.name)
    print(f"wrote {len(masks)} synthetic depth maps (16-bit PNG, mm) to {args.out}")
    if args.split:
        print("constant-depth baseline on val:", constant_baseline(args.out, args.split))
    return 0


def constant_baseline(folder: Path, split: Path) -> dict:
    """The train images' median depth predicted everywhere, scored on the val images as `phreg eval` scores."""
    import csv

    from phreg.eval.depth import depth_errors, mean_errors, valid_pixels
    from phreg.eval.inputs import read_depth

    rows = list(csv.DictReader(split.open()))
    depth = {s: [read_depth(folder / r["file"]) for r in rows if r["split"] == s] for s in ("train", "val")}
    median = float(np.median(np.concatenate([d[d > 0] for d in depth["train"]])))
    errors = mean_errors([depth_errors(d, np.full_like(d, median), valid_pixels(d, 10.0)) for d in depth["val"]])
    return dict(median_m=round(median, 3), **{k: round(v, 4) for k, v in errors.items()})


if __name__ == "__main__":
    raise SystemExit(main())
