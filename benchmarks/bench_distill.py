"""Benchmark a recipe's distillation step on the current device, side by side with a reference-style step.

    python benchmarks/bench_distill.py RECIPE [key=value ...] [--steps N] [--compile] [--end-to-end EPOCHS]
                                       [--images N] [--json FILE]

Times phreg's own code (`DenoisedTeacher`, `train_step`) on real photos (data.root, default: the embedded ones) at
the recipe's resolution, views and batch size:
  teacher    all views of a batch through the frozen teacher, merged into targets     views/s, images/s
  student    student forward + backward + optimizer step on given targets             images/s
  step       the whole training step with fresh views (the paper's regime)             images/s
  reference  the same step, reference-style (benchmarks/reference.py), same inputs     images/s and the ratio
  loader     the DataLoader alone (recipe's workers, pinned memory on GPU)             images/s
  *_compiled with --compile: the teacher alone, the step (fresh views) and the student (given targets) compiled
FLOPs per image-step are counted with torch's FlopCounterMode (teacher and student separately); on a GPU the
achieved TFLOP/s and the fraction of the device's bf16 peak (MFU) are printed too. Peak memory: the CUDA allocator
peak per phase on a GPU, the process's peak resident set on the CPU.
--end-to-end EPOCHS also trains EPOCHS epochs on --images photos three ways (reference loop; phreg with fresh views;
phreg with the target cache) and reports wall time per epoch.
--meta puts models and batches on PyTorch's `meta` device while the data stays on the CPU, as a GPU run has it: every
phase runs through the same code without computing anything, so a tensor that mixes the models' device with the CPU,
or a read-back, raises on a machine without a GPU (`benchmarks/gpu_suite.py --dry-run`). Its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from meta_device import meta_allowances, readable  # noqa: E402
from reference import ReferenceStep  # noqa: E402

from phreg.config.recipe import load_recipe  # noqa: E402
from phreg.data.images import EpochSampler, ImageDataset, collate  # noqa: E402
from phreg.data.scan import scan_images  # noqa: E402
from phreg.distill.loop import distill  # noqa: E402
from phreg.distill.step import build_parts, make_accelerator, train_step  # noqa: E402
from phreg.errors import UsageError  # noqa: E402
from phreg.targets.teacher import fill_value  # noqa: E402

# dense bf16 peak TFLOP/s of common accelerators, for MFU
PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0, "4090": 165.0}


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


def timed_pair(fns: dict, device, steps: int, warmup: int) -> dict:
    """Median seconds per call of several functions, timed interleaved (a, b, a, b, ...) so that drift in the
    machine's speed hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def device_name(device: torch.device) -> str:
    if device.type == "meta":
        return "meta (dry run: nothing computed)"
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def flops_per_image(ref: ReferenceStep, images, plans) -> dict:
    """Teacher (all views) and student (forward + backward) FLOPs per image, counted on the eager reference step."""
    b = len(images)
    with FlopCounterMode(display=False) as fc:
        target = ref.targets(images, plans)
    teacher = fc.get_total_flops() / b
    with FlopCounterMode(display=False) as fc:
        pred = ref.student.forward_features(images.to(target.device))[:, ref.student.num_prefix_tokens:]
        ((pred - target) ** 2).mean().backward()
    ref.optimizer.zero_grad()
    return dict(teacher=teacher, student=fc.get_total_flops() / b)


def main(argv=None, progress=None) -> dict:
    """`progress(results so far)` is called after each phase (a caller cut short keeps what was measured)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--steps", type=int, default=3, help="timed repetitions per phase (median is reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--meta", action="store_true", help="models and batches on the meta device: a dry run that "
                    "computes nothing (any device mix or read-back raises); figures meaningless")
    ap.add_argument("--compile", action="store_true", help="also time phreg's step with speed.compile=true")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference-style step")
    ap.add_argument("--end-to-end", type=int, default=0, metavar="EPOCHS")
    ap.add_argument("--images", type=int, default=16, help="photos for --end-to-end (default 16)")
    ap.add_argument("--peak-tflops", type=float, help="device bf16 peak for MFU when not in the built-in table")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.meta and args.end_to_end:
        ap.error("--meta times nothing end to end (phreg distill computes for real); drop --end-to-end")
    with meta_allowances() if args.meta else contextlib.nullcontext():
        return run(args, progress)


def run(args, progress=None) -> dict:
    recipe = load_recipe(args.recipe, args.overrides)
    acc = make_accelerator(recipe, args.cpu or args.meta)
    device, cfg = torch.device("meta") if args.meta else acc.device, recipe.train
    parts = build_parts(recipe, device, "bf16" if acc.mixed_precision == "bf16" else "fp32")
    files, _ = scan_images(recipe.data.root)
    data = ImageDataset(files, recipe.model.img_size, parts.mean, parts.std, recipe.seed, train=True,
                        make_plan=parts.targets.plan_fn())
    loaded = collate([data[(0, i % len(data))] for i in range(cfg.batch_size)])  # on the CPU, as a loader makes it
    # build_parts placed the models; Accelerate must not move them again (to its CPU, from `meta`)
    model, optimizer = acc.prepare(parts.student_tokens, parts.optimizer, device_placement=[False, False])
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in loaded.items()}
    images = parts.targets.normalize(batch["pixels"])
    b, views = cfg.batch_size, recipe.views.num
    ref = None if args.no_reference else ReferenceStep(
        parts.targets.teacher, parts.student, [n for g in parts.groups for n in g["names"]],
        fill_value(recipe.views.fill, parts.mean, parts.std), cfg)

    results, phases = {}, []

    def summary() -> dict:
        return dict(recipe=args.recipe, overrides=args.overrides, model=recipe.model.name,
                    img_size=recipe.model.img_size, views=views, batch_size=b, device=device_name(device),
                    torch_threads=torch.get_num_threads(), precision=str(acc.mixed_precision), torch=torch.__version__,
                    date=time.strftime("%Y-%m-%d"), **results)

    def record(phase, fn, all_views=False, **extra):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(fn, device, args.steps, args.warmup)
        results[phase] = dict(seconds=round(seconds, 4), images_per_s=round(b / seconds, 3),
                              peak_memory_mb=round(peak_memory_mb(device), 1), **extra)
        if all_views:
            results[phase]["views_per_s"] = round(b * views / seconds, 2)
        phases.append(phase)
        if progress:
            progress(summary())

    with_target = dict(batch, target=parts.targets(images, batch["plan"]))
    record("teacher", lambda: parts.targets(images, batch["plan"]), all_views=True)
    record("student", lambda: train_step(acc, model, parts.targets, optimizer, parts.params, with_target, cfg))
    step = lambda: train_step(acc, model, parts.targets, optimizer, parts.params, batch, cfg)  # noqa: E731
    if ref is None:
        record("step", step)
    else:
        x, p = data.normalize(loaded["pixels"]), loaded["plan"]  # on the CPU: where the reference's loader makes them
        gap = (ref.targets(x, p) - with_target["target"].float()).abs().max()  # both on the models' device
        diff = gap.item() if readable(gap) else None
        if acc.mixed_precision == "no" and diff is not None and diff > 1e-3:
            raise SystemExit(f"reference and phreg targets differ by {diff}: not the same work")
        results["targets_max_abs_diff"] = diff
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        both = timed_pair({"step": step, "reference": lambda: ref.step(x, p)}, device, args.steps, args.warmup)
        for phase in ("step", "reference"):
            results[phase] = dict(seconds=round(both[phase], 4), images_per_s=round(b / both[phase], 3),
                                  peak_memory_mb=round(peak_memory_mb(device), 1))
            phases.append(phase)
        results["speedup_step_vs_reference"] = round(both["reference"] / both["step"], 2)
        flops = flops_per_image(ref, x, p)
        results["gflops_per_image_step"] = {k: round(v / 1e9, 1) for k, v in flops.items()}
        total = flops["teacher"] + flops["student"]
        for phase in ("step", "reference"):
            results[phase]["tflops"] = round(total * results[phase]["images_per_s"] / 1e12, 3)
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16.items() if k in device_name(device)), None)
        if device.type == "cuda" and peak:
            for phase in ("step", "reference"):
                results[phase]["mfu"] = round(results[phase]["tflops"] / peak, 3)
        if progress:
            progress(summary())
    if args.compile:  # phreg's own compiled path: StudentTokens and DenoisedTeacher with speed.compile=true
        recipe_c = load_recipe(args.recipe, [*args.overrides, "speed.compile=true"])
        parts_c = build_parts(recipe_c, device, "bf16" if acc.mixed_precision == "bf16" else "fp32")
        model_c, optimizer_c = acc.prepare(parts_c.student_tokens, parts_c.optimizer, device_placement=[False, False])

        def step_c(batch):
            return train_step(acc, model_c, parts_c.targets, optimizer_c, parts_c.params, batch, cfg)

        t0 = time.perf_counter()
        step_c(batch)
        sync(device)
        compile_s = time.perf_counter() - t0
        record("step_compiled", lambda: step_c(batch), first_call_s=round(compile_s, 1))
        record("student_compiled", lambda: step_c(with_target))
        record("teacher_compiled", lambda: parts_c.targets(images, batch["plan"]), all_views=True)  # compiled above
    loader = DataLoader(data, b, sampler=EpochSampler(len(data), recipe.seed), collate_fn=collate,
                        num_workers=recipe.data.num_workers, pin_memory=device.type == "cuda")
    t0, n = time.perf_counter(), 0
    while n < max(4 * b, 32):
        for item in loader:
            n += len(item["pixels"])
    results["loader"] = dict(images_per_s=round(n / (time.perf_counter() - t0), 1), workers=recipe.data.num_workers)

    if args.end_to_end:
        results["end_to_end"] = end_to_end(args, recipe, parts, ref, files[:args.images], device)

    out = summary()
    print_table(out, phases, device)
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def end_to_end(args, recipe, parts, ref, files, device) -> dict:
    """EPOCHS epochs on the same photos: the reference loop, phreg fresh views, phreg with the target cache."""
    epochs, b = args.end_to_end, recipe.train.batch_size
    data = ImageDataset(files, recipe.model.img_size, parts.mean, parts.std, recipe.seed, train=True,
                        make_plan=parts.targets.plan_fn())
    steps = (len(data) + b - 1) // b
    out = dict(images=len(files), epochs=epochs)
    if ref is not None:
        per_epoch = []
        for epoch in range(epochs):
            t0 = time.perf_counter()
            for start in range(0, len(data), b):
                items = collate([data[(epoch, i)] for i in range(start, min(start + b, len(data)))])
                ref.step(data.normalize(items["pixels"]), items["plan"])
            per_epoch.append(round(time.perf_counter() - t0, 1))
        out["reference"] = dict(total_s=round(sum(per_epoch), 1), epoch_s=per_epoch)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        for f in files:
            (root / f.name).symlink_to(f.resolve())
        for name, cache in (("phreg_fresh", "false"), ("phreg_cached", "true")):
            r = load_recipe(args.recipe, [*args.overrides, f"output_dir={tmp}/{name}", f"data.root={root}",
                                          f"train.epochs={epochs}", "train.max_steps=0", f"train.log_every={steps}",
                                          f"cache.enabled={cache}", "cache.plans=1", "train.save_every=0",
                                          "data.val_root=null", "data.val_split=0"])
            run = distill(r, cpu=device.type == "cpu", quiet=True)
            summary = json.loads((run / "summary.json").read_text())
            elapsed = [json.loads(ln)["elapsed_s"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
            epoch_s = [round(b2 - a, 1) for a, b2 in zip([0.0] + elapsed[:-1], elapsed)]
            out[name] = dict(total_s=summary["timings"]["total_s"], cache_s=summary["timings"]["cache_s"],
                             epoch_s=epoch_s)
            if cache == "true":
                meta = json.loads((run / "target_cache" / "meta.json").read_text())
                out[name]["cache_bytes_per_image"] = meta["bytes_per_image_plan"]
    fresh, cached = out["phreg_fresh"], out["phreg_cached"]
    out["cached_epoch_speedup_vs_fresh_epoch"] = round(statistics.mean(fresh["epoch_s"]) /
                                                       statistics.mean(cached["epoch_s"]), 2)
    if "reference" in out:
        out["cached_run_speedup_vs_reference"] = round(out["reference"]["total_s"] / cached["total_s"], 2)
        out["fresh_run_speedup_vs_reference"] = round(out["reference"]["total_s"] / fresh["total_s"], 2)
    return out


def print_table(out: dict, phases: list[str], device: torch.device) -> None:
    mem = "peak GPU MB" if device.type == "cuda" else "peak RSS MB"
    print(f"\n{out['model']} @ {out['img_size']}px, {out['views']} views, batch {out['batch_size']}, {out['device']}, "
          f"{out['torch_threads']} threads, precision {out['precision']}, torch {out['torch']}, {out['date']}")
    print(f"{'phase':<15}{'images/s':>10}{'views/s':>10}{'s/iter':>9}{'TFLOP/s':>9}{'MFU':>7}{mem:>13}")
    for phase in phases:
        r = out[phase]
        print(f"{phase:<15}{r['images_per_s']:>10.3f}{r.get('views_per_s', float('nan')):>10.2f}{r['seconds']:>9.3f}"
              f"{r.get('tflops', float('nan')):>9.3f}{r.get('mfu', float('nan')):>7.3f}{r['peak_memory_mb']:>13.0f}")
    print(f"{'loader':<15}{out['loader']['images_per_s']:>10.1f}   ({out['loader']['workers']} workers)")
    if "speedup_step_vs_reference" in out:
        g = out["gflops_per_image_step"]
        print(f"phreg step vs reference-style step: {out['speedup_step_vs_reference']:.2f}x   "
              f"(GFLOPs per image-step: teacher {g['teacher']}, student {g['student']}; "
              f"targets agree to {out['targets_max_abs_diff'] or float('nan'):.1e})")
    e = out.get("end_to_end")
    if e:
        print(f"end to end, {e['epochs']} epochs on {e['images']} images (wall seconds per epoch):")
        for name in ("reference", "phreg_fresh", "phreg_cached"):
            if name in e:
                extra = f"  (cache build {e[name]['cache_s']} s)" if e[name].get("cache_s") else ""
                print(f"  {name:<14}{e[name]['total_s']:>8.1f} s total  {e[name]['epoch_s']}{extra}")
        print(f"  cached epochs vs fresh-view epochs: {e['cached_epoch_speedup_vs_fresh_epoch']:.2f}x"
              + (f";  cached run vs reference: {e['cached_run_speedup_vs_reference']:.2f}x"
                 if "cached_run_speedup_vs_reference" in e else ""))


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"bench_distill: error: {e}", file=sys.stderr)
        sys.exit(2)
