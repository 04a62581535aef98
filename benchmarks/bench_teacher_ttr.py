"""Distil from a cleaner teacher? Students trained on plain targets vs targets read with test-time registers.

    python benchmarks/bench_teacher_ttr.py --teacher vit_small_patch14_dinov2 --checkpoint FIXTURE.safetensors \
        --clean DINOv2_S.safetensors --runs runs/plain runs/ttr --val VAL_DIR [--json FILE]

`--runs`: finished `phreg distill` runs of the same recipe, one with `model.teacher_ttr=none`, one with `find` (or a
sidecar). Each student is scored on `--val` (held-out images) against the TTA-denoised features of
  artifact teacher   the plain teacher (what `phreg eval` and a run's held-out score use)
  TTR teacher        the teacher with test-time registers (the neurons found on --val's first 16 images)
  clean model        `--clean`: the model the fixture was made from (ground truth; fixture only)
as mean and p50/p90/p99 of per-token 1 - cos, and by its outliers: patch tokens beyond 2x or below 1/2 of the image
median norm at the last block (two-tailed rule), and above the artifact teacher's own `inspect` threshold.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from phreg.config.recipe import ModelCfg, ViewsCfg
from phreg.data.images import ImageDataset
from phreg.data.scan import scan_images
from phreg.eval.metrics import block_patch_norms, tail_fractions, token_distances
from phreg.eval.tokens import outlier_threshold
from phreg.models.loading import load_teacher, normalization
from phreg.models.specs import load_spec
from phreg.targets.heldout import HeldOut
from phreg.targets.teacher import DenoisedTeacher
from phreg.ttr.model import add_test_time_registers
from phreg.ttr.neurons import find_register_neurons


def scores(held: HeldOut, model) -> dict:
    d = token_distances(held, model).flatten().numpy()
    return dict(mean=float(d.mean()), **{f"p{q}": float(np.quantile(d, q / 100)) for q in (50, 90, 99)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="vit_small_patch14_dinov2")
    ap.add_argument("--checkpoint", required=True, help="the teacher's weights (the fixture, or real DINOv2-S)")
    ap.add_argument("--clean", help="the clean weights the fixture was made from (ground truth)")
    ap.add_argument("--runs", nargs="+", required=True, help="finished phreg distill runs to compare")
    ap.add_argument("--val", required=True, help="held-out images")
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelCfg(name=args.teacher, checkpoint=args.checkpoint, img_size=224)
    teacher = load_teacher(cfg)
    mean, std = normalization(teacher, cfg)
    files, _ = scan_images(args.val)
    data = ImageDataset(files, 224, mean, std, train=False)
    x = data.images()
    found = find_register_neurons(teacher, x[:16])
    refs = {"artifact teacher": teacher}
    if found:
        refs["TTR teacher"] = add_test_time_registers(teacher, found)
    if args.clean:
        refs["clean model"] = load_teacher(ModelCfg(name=args.teacher, checkpoint=args.clean, img_size=224))
    views = ViewsCfg(num=args.views)
    held = {k: HeldOut.from_images(x, DenoisedTeacher(m, views, mean, std), 0, "cpu") for k, m in refs.items()}
    threshold = outlier_threshold(block_patch_norms(teacher, x)[-1])["threshold"]
    report = dict(val_images=len(x), neurons=found.by_layer(), threshold=threshold, models={})
    models = {"teacher": teacher}
    for run in args.runs:
        models[run] = load_spec(run).model
    for name, model in models.items():
        norms = block_patch_norms(model, x)
        tails = tail_fractions(norms)[-1]
        report["models"][name] = dict(
            distance={k: scores(h, model) for k, h in held.items()},
            outliers_two_tailed=tails["both"], outliers_high=tails["high"], outliers_low=tails["low"],
            above_teacher_threshold=float((norms[-1] > threshold).float().mean()))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
