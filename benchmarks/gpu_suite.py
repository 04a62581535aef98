"""phreg on one GPU, in one JSON: what `benchmarks/gpu_suite.sh` runs (README "Performance").

    python benchmarks/gpu_suite.py [--out FILE] [--dry-run] [--budget SECONDS]

Random-init weights (the real ones do not travel), 256 photos made from the embedded ones (a fresh-view run stays
within one epoch, as nearly every step of a real data set does), and the paper's DINOv2-B
setting: 518 px, 10 views, batch 8, bf16. The parts, most important first, each time-boxed; the JSON is rewritten
after every part, so a suite cut short still returns what it measured (a part that ran out of time says so):

* `bench`: `bench_distill` phases, eager and compiled: teacher alone, student on given targets, the fresh-view step
  against the reference-style step (`benchmarks/reference.py`); images/s, peak memory, MFU;
* `distill`: `phreg distill` itself, end to end, in its own process: fresh views eager, fresh views compiled, cached
  targets (build included); steady-state images/s from its metrics.jsonl, against `train_step` alone;
* `sync_check`: a few steps under `torch.cuda.set_sync_debug_mode("error")`: a host sync inside the step raises, and
  its message is recorded;
* `levers`: each speed switch on and off, teacher alone and the fresh-view step: fused attention, teacher bf16
  autocast vs fp32, a bf16 *weight* copy of the teacher, channels-last views, `speed.compile_mode`;
* `projection`: hours of the paper's recipe (100 epochs of Flickr30k's 31,783 images), fresh views and cached (its
  build included), from the `distill` rates;
* `memory`: the allocator peak of one step of ViT-L/14 and ViT-g/14 at the same setting.

MFU counts the issue's FLOPs (ViT-B, 518 px, 10 views, from `FlopCounterMode` on the reference step): 3,031.5 GFLOP
teacher + 705.4 student = 3.737 TFLOP per image-step, against the device's dense bf16 peak (H100/H200: 989 TFLOP/s).
`--dry-run` runs every part on the CPU with a tiny setting (DINOv2-S, 56 px, 2 views, batch 2, fp32), so the script
is known to work before a GPU is at hand. Without a GPU and without `--dry-run` it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_distill  # noqa: E402

from phreg.files.atomic import write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "dinov2_vitb14.yaml")
FLICKR30K_IMAGES, EPOCHS = 31_783, 100
ISSUE_GFLOP = dict(teacher=3031.5, student=705.4)  # per image, ViT-B/14 at 518 px, 10 views (issue 19)
FULL = dict(base="vit_base_patch14_dinov2", large="vit_large_patch14_dinov2", giant="vit_giant_patch14_dinov2",
            img_size=518, views=10, batch=8, steps=5, warmup=2, precision="bf16", images=256, workers=8,
            fresh_steps=30, cached_steps=240, log_every=5, budget=465)
DRY = dict(base="vit_small_patch14_dinov2", large="vit_small_patch14_dinov2", giant="vit_small_patch14_dinov2",
           img_size=56, views=2, batch=2, steps=1, warmup=1, precision="fp32", images=8, workers=0,
           fresh_steps=8, cached_steps=8, log_every=2, budget=3000)


class OutOfTime(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: float):
    """Raise OutOfTime in the main thread after `seconds` (a part that overruns its box is cut, the suite goes on)."""
    def ring(*_):
        raise OutOfTime(f"cut after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def fresh_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def random_weights(name: str, folder: Path, device: torch.device) -> Path:
    """A random-init checkpoint of `name` (initialized on the device: a 1.1B model in seconds), saved once."""
    import safetensors.torch
    import timm

    path = folder / f"{name}.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, device=device)
        safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return path


def make_photos(folder: Path, count: int, short: int) -> Path:
    """`count` JPEGs cut from the embedded photos (random crops, flips, sizes): a data set to decode like real ones."""
    import numpy as np
    from PIL import Image, ImageOps

    from phreg.data.scan import embedded_photos, scan_images

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


def overrides(s: dict, name: str, weights: Path, *extra: str) -> list[str]:
    return [f"model.name={name}", f"model.checkpoint={weights}", f"model.img_size={s['img_size']}",
            f"views.num={s['views']}", f"train.batch_size={s['batch']}", f"train.precision={s['precision']}",
            f"data.num_workers={s['workers']}", "data.val_split=0", "data.val_root=null", *extra]


def mfu(images_per_s: float, gflop: float, peak: float | None) -> float | None:
    return round(images_per_s * gflop / 1e3 / peak, 3) if peak else None


def bench(s: dict, weights: Path, photos: Path, cpu: bool, tmp: Path, peak: float | None) -> dict:
    """bench_distill on the paper's setting, eager and compiled, with MFU against the issue's FLOP count."""
    argv = [RECIPE, *overrides(s, s["base"], weights, f"data.root={photos}"), "--steps", str(s["steps"]),
            "--warmup", str(s["warmup"]), "--compile", "--json", str(tmp / "bench.json")] + (["--cpu"] if cpu else [])
    b = bench_distill.main(argv)
    both = ISSUE_GFLOP["teacher"] + ISSUE_GFLOP["student"]
    gflop = dict(step=both, reference=both, step_compiled=both, student=ISSUE_GFLOP["student"],
                 student_compiled=ISSUE_GFLOP["student"], teacher=ISSUE_GFLOP["teacher"])
    phases = {p: dict(images_per_s=b[p]["images_per_s"], peak_memory_mb=b[p]["peak_memory_mb"],
                      mfu=mfu(b[p]["images_per_s"], g, peak)) for p, g in gflop.items() if p in b}
    return dict(device=b["device"], counted_gflops_per_image_step=b.get("gflops_per_image_step"),
                speedup_step_vs_reference=b.get("speedup_step_vs_reference"),
                compiled_vs_eager_step=round(b["step_compiled"]["images_per_s"] / b["step"]["images_per_s"], 3),
                compile_first_call_s=b["step_compiled"].get("first_call_s"), loader=b["loader"], phases=phases)


def steady_rate(metrics: Path, batch: int, skip: int = 2) -> float | None:
    """Images/s between the `skip`-th logged step and the last (warm-up and compilation left out)."""
    rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if "step" in r and "loss" in r]
    if len(rows) <= skip:
        return None
    a, b = rows[skip - 1] if skip else dict(step=0, elapsed_s=0.0), rows[-1]
    return round((b["step"] - a["step"]) * batch / max(b["elapsed_s"] - a["elapsed_s"], 1e-9), 2)


def distill_run(s: dict, weights: Path, photos: Path, cpu: bool, tmp: Path, name: str, seconds: float,
                *extra: str) -> dict:
    """`phreg distill` in its own process, as a user runs it; its steady-state images/s from metrics.jsonl."""
    run = tmp / name
    cmd = [sys.executable, "-m", "phreg", "distill", RECIPE, *overrides(s, s["base"], weights, f"data.root={photos}"),
           f"output_dir={run}", "train.save_every=0", f"train.log_every={s['log_every']}", *extra, "--quiet"]
    cmd += ["--cpu"] if cpu else []
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, seconds))
    except subprocess.TimeoutExpired:
        return dict(error=f"cut after {seconds:.0f} s", images_per_s=steady_rate(run / "metrics.jsonl", s["batch"])
                    if (run / "metrics.jsonl").is_file() else None)
    if p.returncode:
        return dict(error=p.stderr.strip().splitlines()[-1:] or [f"exit {p.returncode}"])
    summary = json.loads((run / "summary.json").read_text())
    return dict(images_per_s=steady_rate(run / "metrics.jsonl", s["batch"]), wall_s=round(time.perf_counter() - t0, 1),
                cache_s=summary["timings"]["cache_s"], train_s=summary["timings"]["train_s"],
                steps=summary["steps"], images=summary["images_seen"])


def distill_end_to_end(s: dict, weights: Path, photos: Path, cpu: bool, tmp: Path, deadline: float,
                       result: dict, peak: float | None) -> dict:
    out = {}
    runs = [("fresh_eager", s["fresh_steps"], ["cache.enabled=false", "speed.compile=false"]),
            ("cached_eager", s["cached_steps"], ["cache.enabled=true", "cache.plans=1", "speed.compile=false"]),
            ("fresh_compiled", s["fresh_steps"], ["cache.enabled=false", "speed.compile=true"])]
    for name, steps, extra in runs:
        out[name] = distill_run(s, weights, photos, cpu, tmp, name, deadline - time.perf_counter(),
                                f"train.max_steps={steps}", *extra)
    if "cache_s" in out["cached_eager"]:
        out["cached_eager"]["cache_images"] = s["images"]  # one plan per image
    bench_ = result.get("bench")
    phases = bench_.get("phases", {}) if isinstance(bench_, dict) else {}
    for name, phase, gflop in (("fresh_eager", "step", sum(ISSUE_GFLOP.values())),
                               ("fresh_compiled", "step_compiled", sum(ISSUE_GFLOP.values())),
                               ("cached_eager", "student", ISSUE_GFLOP["student"])):
        rate = out[name].get("images_per_s")
        if rate:
            out[name]["mfu"] = mfu(rate, gflop, peak)
            if phase in phases:  # the loop against its own step, same setting
                out[name]["loop_vs_train_step"] = round(rate / phases[phase]["images_per_s"], 3)
    return out


def sync_check(s: dict, weights: Path, photos: Path, device: torch.device) -> dict:
    """A few eager steps (fresh views, then cached targets) under torch.cuda.set_sync_debug_mode("error")."""
    if device.type != "cuda":
        return dict(skipped="no CUDA device: set_sync_debug_mode needs one (tests/test_fastpath.py runs the "
                            "step's math on meta instead)")
    from phreg.config.recipe import load_recipe
    from phreg.data.images import ImageDataset, collate
    from phreg.data.scan import scan_images
    from phreg.distill.step import build_parts, make_accelerator, train_step

    fresh_accelerate()
    recipe = load_recipe(RECIPE, overrides(s, s["base"], weights, f"data.root={photos}", "speed.compile=false"))
    acc = make_accelerator(recipe)
    parts = build_parts(recipe, acc.device, "bf16" if acc.mixed_precision == "bf16" else "fp32")
    model, optimizer = acc.prepare(parts.student_tokens, parts.optimizer)
    files, _ = scan_images(photos)
    data = ImageDataset(files, s["img_size"], parts.mean, parts.std, train=True, make_plan=parts.targets.plan_fn())
    batch = collate([data[(0, i)] for i in range(s["batch"])])
    batch = {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    cached = dict(batch, target=parts.targets(parts.targets.normalize(batch["pixels"]), batch["plan"]))
    out = {}
    for name, b in (("fresh_views", batch), ("cached_targets", cached)):
        train_step(acc, model, parts.targets, optimizer, parts.params, b, recipe.train)  # warm-up: lazy inits sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                train_step(acc, model, parts.targets, optimizer, parts.params, b, recipe.train)
            out[name] = "no host sync in 3 steps"
        except RuntimeError as e:
            frames = [f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_tb(e.__traceback__)]
            out[name] = dict(error=str(e).splitlines()[0], where=frames[-6:])
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return out


def levers(s: dict, weights: Path, photos: Path, device: torch.device, deadline: float) -> dict:
    """Each switch on and off, eager unless it is a compile mode: teacher alone (views/s) and the fresh-view step."""
    from phreg.backbones import PatchTokens
    from phreg.config.recipe import load_recipe
    from phreg.data.images import ImageDataset, collate
    from phreg.data.scan import scan_images
    from phreg.distill.step import build_parts, make_accelerator, train_step

    settings = {"baseline": [], "fused_attn=false": ["speed.fused_attn=false"],
                "teacher_precision=fp32": ["speed.teacher_precision=fp32"],
                "teacher_bf16_weights": [], "channels_last_views": [],
                "compile_mode=max-autotune-no-cudagraphs": ["speed.compile=true",
                                                            "speed.compile_mode=max-autotune-no-cudagraphs"]}
    out = {}
    for name, extra in settings.items():
        left = deadline - time.perf_counter()
        if left < 20:
            out[name] = "skipped: out of time"
            continue
        try:
            with time_box(left - 5):
                fresh_accelerate()
                recipe = load_recipe(RECIPE, overrides(s, s["base"], weights, f"data.root={photos}",
                                                       "speed.compile=false", *extra))
                acc = make_accelerator(recipe, cpu=device.type == "cpu")
                parts = build_parts(recipe, acc.device, "bf16" if acc.mixed_precision == "bf16" else "fp32")
                model, optimizer = acc.prepare(parts.student_tokens, parts.optimizer)
                files, _ = scan_images(photos)
                data = ImageDataset(files, s["img_size"], parts.mean, parts.std, train=True,
                                    make_plan=parts.targets.plan_fn())
                batch = collate([data[(0, i)] for i in range(s["batch"])])
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                targets = parts.targets
                images = targets.normalize(batch["pixels"])
                if name == "teacher_bf16_weights":  # a bf16 copy: costs the teacher's weights again in memory
                    targets.tokens = PatchTokens(copy.deepcopy(targets.teacher).to(torch.bfloat16),
                                                 targets.tokens.tap, targets.tokens.sigma)
                    targets.autocast = contextlib.nullcontext
                    images = images.to(torch.bfloat16)
                if name == "channels_last_views":
                    images = images.contiguous(memory_format=torch.channels_last)
                teacher_s = bench_distill.timed(lambda: targets(images, batch["plan"]), device,
                                                s["steps"], s["warmup"])
                row = dict(teacher_views_per_s=round(s["batch"] * s["views"] / teacher_s, 2))
                if name not in ("teacher_bf16_weights",):
                    step_s = bench_distill.timed(lambda: train_step(acc, model, targets, optimizer, parts.params,
                                                                    batch, recipe.train), device, s["steps"],
                                                 s["warmup"])
                    row["step_images_per_s"] = round(s["batch"] / step_s, 2)
                out[name] = row
        except (OutOfTime, RuntimeError) as e:
            out[name] = f"failed: {str(e).splitlines()[0][:200]}"
        finally:
            parts = model = optimizer = targets = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def projection(d: dict, plans: int = 1) -> dict:
    """Hours of 100 epochs of Flickr30k at the measured end-to-end rates; cached: the build of `plans` plans per image
    at the rate the measured build had, then the cached epochs."""
    images = FLICKR30K_IMAGES * EPOCHS
    out = dict(images=FLICKR30K_IMAGES, epochs=EPOCHS, image_steps=images, target_hours=dict(fresh=7.5, cached=1.5))
    fresh = max((d.get(k, {}).get("images_per_s") or 0) for k in ("fresh_eager", "fresh_compiled"))
    if fresh:
        out["fresh_hours"] = round(images / fresh / 3600, 2)
    cached = d.get("cached_eager", {})
    if cached.get("images_per_s") and cached.get("cache_s"):
        build_h = plans * FLICKR30K_IMAGES / (cached["cache_images"] / cached["cache_s"]) / 3600
        out["cache_plans"], out["cache_build_hours"] = plans, round(build_h, 2)
        out["cached_hours"] = round(build_h + images / cached["images_per_s"] / 3600, 2)
    return out


def memory(s: dict, tmp: Path, device: torch.device, deadline: float) -> dict:
    """Allocator peak (MB) of two steps (AdamW moments included) of ViT-L/14 and ViT-g/14, fresh views."""
    from phreg.config.recipe import load_recipe
    from phreg.data.images import ImageDataset, collate
    from phreg.data.scan import scan_images
    from phreg.distill.step import build_parts, make_accelerator, train_step

    out = {}
    for key in ("large", "giant"):
        if deadline - time.perf_counter() < 30:
            out[key] = "skipped: out of time"
            continue
        weights = random_weights(s[key], tmp, device)
        try:
            with time_box(deadline - time.perf_counter() - 5):
                fresh_accelerate()
                recipe = load_recipe(RECIPE, overrides(s, s[key], weights, "speed.compile=false"))
                acc = make_accelerator(recipe, cpu=device.type == "cpu")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                parts = build_parts(recipe, acc.device, "bf16" if acc.mixed_precision == "bf16" else "fp32")
                model, optimizer = acc.prepare(parts.student_tokens, parts.optimizer)
                files, _ = scan_images(None)
                data = ImageDataset(files, s["img_size"], parts.mean, parts.std, train=True,
                                    make_plan=parts.targets.plan_fn())
                batch = collate([data[(0, i % len(data))] for i in range(s["batch"])])
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                for _ in range(2):
                    train_step(acc, model, parts.targets, optimizer, parts.params, batch, recipe.train)
                bench_distill.sync(device)
                out[key] = dict(model=s[key], peak_mb=round(bench_distill.peak_memory_mb(device)),
                                parameters_m=round(sum(p.numel() for p in parts.targets.teacher.parameters()) / 1e6, 1))
        except (OutOfTime, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
            out[key] = f"failed: {str(e).splitlines()[0][:200]}"
        finally:
            parts = model = optimizer = None
            weights.unlink(missing_ok=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def run_part(result: dict, out: Path, name: str, deadline: float, share: float, fn) -> None:
    """One part inside its time box (`share` of what is left, at most); its result, or why it has none, goes into the
    JSON, which is rewritten at once."""
    began = time.perf_counter()
    left = deadline - began
    if left < 10:
        result[name] = "skipped: out of time"
    else:
        try:
            with time_box(left * share):
                result[name] = fn(began + left * share)
        except OutOfTime as e:
            result[name] = f"out of time: {e}"
        except Exception as e:  # a part's failure must not cost the other parts
            result[name] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                                where=traceback.format_exc().splitlines()[-6:])
    result.setdefault("part_s", {})[name] = round(time.perf_counter() - began, 1)
    write_json(out, result)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_suite.json")
    ap.add_argument("--dry-run", action="store_true", help="every part on the CPU with a tiny setting")
    ap.add_argument("--budget", type=float, help="seconds for the whole suite (default: 465 on a GPU)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu_suite: no CUDA GPU on this machine; nothing measured (--dry-run runs a tiny CPU version)")
        return 0
    s = dict(DRY if args.dry_run else FULL)
    cpu = not torch.cuda.is_available() or args.dry_run
    device = torch.device("cpu" if cpu else "cuda")
    began = time.perf_counter()
    deadline = began + (args.budget or s["budget"])
    out = Path(args.out)
    peak = None if cpu else next((v for k, v in bench_distill.PEAK_BF16.items()
                                  if k in torch.cuda.get_device_name()), None)
    result = dict(suite="phreg gpu_suite", dry_run=args.dry_run, settings=s, torch=torch.__version__,
                  device=bench_distill.device_name(device), peak_bf16_tflops=peak, issue_gflops=ISSUE_GFLOP,
                  date=time.strftime("%Y-%m-%d %H:%M:%S"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = random_weights(s["base"], tmp, device)
        photos = make_photos(tmp / "photos", s["images"], s["img_size"])
        run_part(result, out, "bench", deadline, 0.40,
                 lambda _: bench(s, base, photos, cpu, tmp, peak))
        run_part(result, out, "distill", deadline, 0.60,
                 lambda end: distill_end_to_end(s, base, photos, cpu, tmp, end, result, peak))
        run_part(result, out, "sync_check", deadline, 0.25, lambda _: sync_check(s, base, photos, device))
        run_part(result, out, "projection", deadline, 1.0, lambda _: projection(result.get("distill", {})))
        run_part(result, out, "levers", deadline, 0.70, lambda end: levers(s, base, photos, device, end))
        run_part(result, out, "memory", deadline, 1.0, lambda end: memory(s, tmp, device, end))
    result["wall_s"] = round(time.perf_counter() - began, 1)
    write_json(out, result)
    print(json.dumps(result, indent=2))
    print(f"gpu_suite: wrote {out} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
