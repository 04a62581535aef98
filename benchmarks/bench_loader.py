"""The training loader alone, no model: how many images/s `distill`'s own loader hands to the step.

    python benchmarks/bench_loader.py --model vit_base_patch14_dinov2 --img-size 518 [--batch 8] [--workers 2]
                                      [--images 64] [--seconds 10] [--cpu] [--json FILE]

Both regimes, built by the functions `phreg distill` builds them with (`training_images`, `training_loader`), on JPEG
photos cut from the embedded ones:
  decode   the same work image by image in one process, no loader: what each data worker can do at best
  fresh    data workers decode, resize and crop each image and draw its view plan (uint8 batches)
  cached   batches read whole from a target cache of the model's token shape (L x D, float16) and image size;
           the cache is built first by the product's own build pipeline with a stand-in teacher (constant targets),
           whose rate is reported as `build` (decode + write + checksum, no teacher)
Batches go as far as the step receives them: through Accelerate's prepared loader onto the device (on a GPU pinned,
copied without blocking, and waited for). Images/s are counted after one warm-up epoch (worker start, first reads).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from phreg.config.recipe import load_recipe
from phreg.data.images import Normalize
from phreg.data.scan import embedded_photos, scan_images
from phreg.data.sources import open_sources
from phreg.distill.session import training_images, training_loader
from phreg.distill.step import make_accelerator
from phreg.targets.cache import TargetCache
from phreg.targets.views import plan_sampler


def make_photos(folder: Path, count: int, short: int) -> Path:
    """`count` JPEGs cut from the embedded photos (random crops, flips, sizes): a data set to decode like real ones."""
    from PIL import Image, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    sources = [Image.open(p).convert("RGB") for p in scan_images(embedded_photos())[0]]
    rng = np.random.default_rng(0)
    for i in range(count):
        img = sources[i % len(sources)]
        s = (short + int(rng.integers(0, short // 4))) / min(img.size)
        img = img.resize((max(short, round(img.width * s)), max(short, round(img.height * s))), Image.BICUBIC)
        img = ImageOps.mirror(img) if rng.random() < 0.5 else img
        img.save(folder / f"photo_{i:03d}.jpg", quality=90)
    return folder


class StandInTeacher:
    """What the cache build asks of a teacher (`DenoisedTeacher`'s surface), with constant targets of the real shape
    (made in no time, so that the build's rate is its decoding, writing and checksums)."""

    def __init__(self, model_name: str, img_size: int, views, mean, std):
        import timm

        from phreg.backbones import backbone

        family = backbone(timm.create_model(model_name, pretrained=False, img_size=img_size, device="meta"))
        self.grid, self.cfg = family.grid, views
        self.num_patches, self.dim = self.grid[0] * self.grid[1], family.head_dim("final")
        self.normalize = Normalize(mean, std)

    def plan_fn(self):
        return plan_sampler(self.grid, self.cfg)

    def __call__(self, images: torch.Tensor, plans: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(images), self.num_patches, self.dim, device=images.device)


def rate(loader, batch: int, seconds: float, device: torch.device) -> dict:
    """Images/s over whole epochs after a warm-up epoch, for at least `seconds`."""
    def epoch(e: int) -> int:
        loader.set_epoch(e)
        n = 0
        for b in loader:
            n += len(b["pixels"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return n

    began = time.perf_counter()
    epoch(0)
    warm = time.perf_counter() - began
    images, e, t0 = 0, 1, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        images += epoch(e)
        e += 1
    took = time.perf_counter() - t0
    return dict(images_per_s=round(images / took, 1), images=images, seconds=round(took, 2),
                first_epoch_s=round(warm, 2), epochs=e - 1, batch=batch)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_base_patch14_dinov2", help="timm name: the token shape of the targets")
    ap.add_argument("--img-size", type=int, default=518)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="data.num_workers")
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--images", type=int, default=64, help="photos in the data set")
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per regime (after a warm-up epoch)")
    ap.add_argument("--cpu", action="store_true", help="batches to the CPU even where a GPU is")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = make_photos(tmp / "photos", args.images, args.img_size)
        recipe = load_recipe(None, [f"model.name={args.model}", f"model.img_size={args.img_size}",
                                    f"train.batch_size={args.batch}", f"data.num_workers={args.workers}",
                                    f"views.num={args.views}", f"data.root={photos}", "cache.plans=1"])
        acc = make_accelerator(recipe, args.cpu)
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        teacher = StandInTeacher(args.model, args.img_size, recipe.views, mean, std)
        sources = open_sources(recipe.data, recipe.seed)
        out = dict(model=args.model, img_size=args.img_size, target_shape=[teacher.num_patches, teacher.dim],
                   target_dtype=recipe.cache.dtype, workers=args.workers, device=str(acc.device),
                   torch_threads=torch.get_num_threads(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))

        fresh = training_images(recipe, acc, sources, teacher.plan_fn(), mean, std)
        t0 = time.perf_counter()
        for i in range(len(fresh)):
            fresh[(0, i)]
        one = len(fresh) / (time.perf_counter() - t0)
        out["decode"] = dict(images_per_s_one_process=round(one, 1),
                             note="decode, resize, crop and plan of each image in one process, no loader")
        out["fresh"] = rate(training_loader(recipe, acc, fresh), args.batch, args.seconds, acc.device)

        cached = training_images(recipe, acc, sources, teacher.plan_fn(), mean, std)
        began = time.perf_counter()
        cached.cache = TargetCache.open_or_build(tmp / "cache", "bench", cached, teacher, acc, plans=1,
                                                 dtype=recipe.cache.dtype, batch_size=args.batch, quiet=True,
                                                 workers=args.workers)
        build_s = time.perf_counter() - began
        out["build"] = dict(images_per_s=round(len(cached) / build_s, 1), seconds=round(build_s, 2),
                            note="decode, crop, write, checksum; a stand-in teacher (constant targets)")
        out["cached"] = rate(training_loader(recipe, acc, cached), args.batch, args.seconds, acc.device)
        out["cached"]["bytes_per_image"] = json.loads((tmp / "cache" / "meta.json").read_text())["bytes_per_image_plan"]
    print(f"{args.model} @ {args.img_size}px, targets {teacher.num_patches} x {teacher.dim} {recipe.cache.dtype}, "
          f"batch {args.batch}, {args.workers} workers, to {acc.device}")
    print(f"  decode {out['decode']['images_per_s_one_process']:>9.1f} images/s in one process")
    for name in ("fresh", "build", "cached"):
        print(f"  {name:<7}{out[name]['images_per_s']:>9.1f} images/s")
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
