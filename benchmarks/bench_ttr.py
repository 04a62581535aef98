"""Test-time registers on the implanted-artifact fixture: every figure the README and the closing notes quote.

    python benchmarks/bench_ttr.py --weights DINOv2_S.safetensors --camvid CAMVID_SUBSET [--json FILE]
    python benchmarks/bench_ttr.py --weights DINOv2_S.safetensors --images TRAIN_DIR --val VAL_DIR [--json FILE]

DINOv2-S/14 at 224 px with artifacts implanted by `phreg.eval.implant` (ground truth: the units it overwrote), and
its low-norm variant (`phreg.eval.implant.cancel_artifacts`). The register neurons are found on `--images` (16 by
default); outliers, CLS cosines and timings are measured on `--val`. `--camvid` takes both from the CamVid subset
of ../shared/assets (its manifest's train and val frames). Reports:
  precision / recall   the finder's neurons against the implanted units (high-norm and low-norm fixture)
  outlier cut          1 - outlier tokens with test-time registers / without, on --val, at the last block: the
                       two-tailed ratio rule and, for the high-norm fixture, the teacher's own `inspect` threshold
  CLS cosine           final class token with test-time registers vs the artifact teacher and vs the clean model
  clean                the finder on the clean model (must find none)
  finder s/image       wall time of `find_register_neurons` per image (median of 3)
  forward ms/image     teacher, test-time registers (token + hooks), token only: interleaved, median of --reps
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from phreg.config.recipe import ModelCfg
from phreg.data.images import ImageDataset
from phreg.data.scan import scan_images
from phreg.eval.implant import calibration_images, cancel_artifacts, implant_artifacts
from phreg.eval.tokens import outlier_threshold
from phreg.models.loading import load_teacher, normalization
from phreg.ttr.model import add_test_time_registers
from phreg.ttr.neurons import find_register_neurons, outlier_mask


def images(files, n, size, mean, std) -> torch.Tensor:
    data = ImageDataset(files[:n], size, mean, std, train=False)
    return data.images()


@torch.no_grad()
def last_block_norms(model, x) -> torch.Tensor:
    return model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True)[-1] \
        .norm(dim=-1)


def precision_recall(found, implanted) -> dict:
    truth = {(implanted["block"], u) for u in implanted["units"]}
    got = {(n.layer, n.index) for n in found.neurons}
    return dict(precision=len(got & truth) / len(got) if got else None, recall=len(got & truth) / len(truth),
                found=[f"{b}:{u}" for b, u in sorted(got)], implanted=[f"{b}:{u}" for b, u in sorted(truth)])


def outlier_cut(teacher, ttr, x) -> dict:
    before, after = last_block_norms(teacher, x), last_block_norms(ttr, x)
    n0, n1 = (int(sum(m.sum() for m in outlier_mask(n))) for n in (before, after))
    out = dict(teacher=n0, ttr=n1, cut=1 - n1 / n0 if n0 else None)
    thr = outlier_threshold(before)["threshold"]
    if thr != float("inf"):
        t0, t1 = int((before > thr).sum()), int((after > thr).sum())
        out["inspect_threshold"] = dict(threshold=thr, teacher=t0, ttr=t1, cut=1 - t1 / t0)
    return out


@torch.no_grad()
def cls_cosine(a, b, x) -> float:
    return float(F.cosine_similarity(a.forward_features(x)[:, 0], b.forward_features(x)[:, 0], dim=-1).mean())


def timed(fn, reps=3) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="DINOv2-S/14 safetensors (timm vit_small_patch14_dinov2)")
    ap.add_argument("--camvid", type=Path, help="the CamVid subset folder (manifest.csv, images/): train and val")
    ap.add_argument("--images", help="unlabeled images the neurons are found on")
    ap.add_argument("--val", help="held-out images for outliers, cosines and timings")
    ap.add_argument("--n", type=int, default=16, help="images used from --images")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.camvid:
        with open(args.camvid / "manifest.csv") as f:
            rows = list(csv.DictReader(f))
        split = {part: sorted(args.camvid / "images" / r["file"] for r in rows if r["split"] == part)
                 for part in ("train", "val")}
    elif args.images and args.val:
        split = dict(train=scan_images(args.images)[0], val=scan_images(args.val)[0])
    else:
        ap.error("give --camvid, or --images and --val")
    torch.manual_seed(0)
    cfg = ModelCfg(name="vit_small_patch14_dinov2", checkpoint=args.weights, img_size=224)
    clean = load_teacher(cfg)
    mean, std = normalization(clean, cfg)
    train = images(split["train"], args.n, 224, mean, std)
    val = images(split["val"], 10_000, 224, mean, std)

    high = copy.deepcopy(clean)
    implanted = implant_artifacts(high, calibration_images(224, mean, std))
    low = copy.deepcopy(high)
    cancelled = cancel_artifacts(low, calibration_images(224, mean, std, crops=4), implanted)
    report = dict(images=len(train), val_images=len(val), device=str(next(clean.parameters()).device),
                  threads=torch.get_num_threads(), implanted=implanted["units"], block=implanted["block"],
                  low_norm_fit=cancelled)

    found_clean = find_register_neurons(clean, train)
    report["clean"] = dict(neurons=len(found_clean.neurons), outlier_tokens=found_clean.outliers["tokens"])
    for name, model in (("high_norm", high), ("low_norm", low)):
        found = find_register_neurons(model, train)
        ttr = add_test_time_registers(model, found)
        report[name] = dict(
            **precision_recall(found, implanted), coverage=found.coverage, appear=found.appear,
            outliers=found.outliers["tokens"],
            high_tail_only=precision_recall(find_register_neurons(model, train, tails="high"), implanted),
            outlier_cut=outlier_cut(model, ttr, val),
            cls_cosine_to_teacher=cls_cosine(model, ttr, val), cls_cosine_to_clean=cls_cosine(clean, ttr, val),
            teacher_cls_cosine_to_clean=cls_cosine(clean, model, val))
        report[name]["finder_s_per_image"] = timed(lambda: find_register_neurons(model, train)) / len(train)

    ttr = add_test_time_registers(high, find_register_neurons(high, train))
    token_only = add_test_time_registers(high, {})
    x = val[:8]
    runs = {"teacher": high, "test_time_registers": ttr, "extra_token_only": token_only}
    times = {k: [] for k in runs}
    with torch.no_grad():
        for m in runs.values():
            m.forward_features(x)  # warm-up
        for _ in range(args.reps):  # interleaved: the machine's speed drifts
            for k, m in runs.items():
                times[k].append(timed(lambda: m.forward_features(x), 1))
    report["forward_ms_per_image"] = {k: 1000 * statistics.median(v) / len(x) for k, v in times.items()}
    report["hook_overhead"] = report["forward_ms_per_image"]["test_time_registers"] / \
        report["forward_ms_per_image"]["extra_token_only"] - 1
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
