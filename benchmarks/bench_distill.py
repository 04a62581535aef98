"""Benchmark the distillation step of a recipe on the current device.

    python benchmarks/bench_distill.py RECIPE [key=value ...] [--steps N] [--warmup N] [--json FILE]

Times phreg's own code paths (`DenoisedTeacher`, `train_step`) on real photos (data.root, default: the embedded ones)
at the recipe's resolution, views and batch size:
  teacher  all views of a batch through the frozen teacher, merged into targets   -> views/s and images/s
  student  student forward + backward + optimizer step on given targets          -> images/s
  step     the whole training step, teacher included (fresh views, as the paper)  -> images/s
Peak memory: CUDA allocator peak per phase on a GPU; on the CPU, the process's peak resident set size so far.
Prints a table and one JSON object (also written to --json FILE).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import torch

from phreg.data import ImageDataset, collate, scan_images
from phreg.errors import UsageError
from phreg.recipe import load_recipe
from phreg.train import build_parts, make_accelerator, train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(fn, device, steps: int, warmup: int) -> float:
    """Median seconds per call after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--steps", type=int, default=3, help="timed repetitions per phase (median is reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)

    recipe = load_recipe(args.recipe, args.overrides)
    acc = make_accelerator(recipe, args.cpu)
    device, cfg = acc.device, recipe.train
    parts = build_parts(recipe, device)
    files, _ = scan_images(recipe.data.root)
    data = ImageDataset(files, recipe.model.img_size, parts.mean, parts.std, recipe.seed, train=True,
                        make_plan=parts.teacher.plan_fn())
    batch = collate([data[(0, i % len(data))] for i in range(cfg.batch_size)])
    model, optimizer = acc.prepare(parts.model, parts.optimizer)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    b, views = cfg.batch_size, recipe.views.num

    def teacher():
        with torch.no_grad(), acc.autocast():
            return parts.teacher(batch["image"], batch["plan"])

    with_target = dict(batch, target=teacher())
    results, rows = {}, []
    for phase, fn in [("teacher", teacher),
                      ("student", lambda: train_step(acc, model, parts.teacher, optimizer, parts.params,
                                                     with_target, cfg)),
                      ("step", lambda: train_step(acc, model, parts.teacher, optimizer, parts.params, batch, cfg))]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(fn, device, args.steps, args.warmup)
        results[phase] = dict(seconds=round(seconds, 4), images_per_s=round(b / seconds, 3),
                              peak_memory_mb=round(peak_memory_mb(device), 1))
        if phase == "teacher":
            results[phase]["views_per_s"] = round(b * views / seconds, 2)
        rows.append(phase)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    out = dict(recipe=args.recipe, overrides=args.overrides, model=recipe.model.name, img_size=recipe.model.img_size,
               views=views, batch_size=b, device=f"{device} ({name})", torch_threads=torch.get_num_threads(),
               precision=str(acc.mixed_precision), torch=torch.__version__, **results)
    mem = "peak GPU MB" if device.type == "cuda" else "peak RSS MB"
    print(f"\n{recipe.model.name} @ {recipe.model.img_size}px, {views} views, batch {b}, {out['device']}, "
          f"{out['torch_threads']} threads, precision {out['precision']}")
    print(f"{'phase':<10}{'images/s':>10}{'views/s':>10}{'s/iter':>10}{mem:>14}")
    for phase in rows:
        r = results[phase]
        print(f"{phase:<10}{r['images_per_s']:>10.3f}{r.get('views_per_s', float('nan')):>10.2f}"
              f"{r['seconds']:>10.3f}{r['peak_memory_mb']:>14.0f}")
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"bench_distill: error: {e}", file=sys.stderr)
        sys.exit(2)
