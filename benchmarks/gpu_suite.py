"""phreg on one GPU, in one JSON: what `benchmarks/gpu_suite.sh` runs (see README "Scale").

    python benchmarks/gpu_suite.py [--out FILE] [--dry-run]

Random-init weights (the real ones do not travel), the embedded photos, and the paper's DINOv2-B setting: 518 px,
10 views, batch 8, bf16. It records

* `step`: phreg's step (fresh views) vs the reference-style step (`benchmarks/reference.py`), eager and compiled, and
  `cached`: the step on cached targets (student only), eager and compiled: images/s, TFLOP/s, MFU against the
  device's dense bf16 peak (`bench_distill.PEAK_BF16`);
* `peak_memory`: the CUDA allocator's peak for one fresh-view step of ViT-L/14 and ViT-g/14 at the same setting
  (again with `speed.grad_checkpointing=true` where the plain step does not fit);
* `run`: a 30-step `phreg distill` whose loss must fall;
* `projection`: H100-hours of the paper's recipe (100 epochs of Flickr30k's 31,783 images) with fresh views and with
  the target cache (its build included), from the measured rates.

`--dry-run` runs every part on the CPU with a tiny setting (DINOv2-S at 112 px, 2 views, batch 2, fp32), so the
script is known to work before a GPU is at hand. Without a GPU and without `--dry-run` it prints one line, exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_distill  # noqa: E402

from phreg.files import write_json  # noqa: E402

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "dinov2_vitb14.yaml")
FLICKR30K_IMAGES, EPOCHS, H100_PEAK = 31_783, 100, 989.0
FULL = dict(base="vit_base_patch14_dinov2", large="vit_large_patch14_dinov2", giant="vit_giant_patch14_dinov2",
            img_size=518, views=10, batch=8, steps=5, warmup=2, run_steps=30, precision="bf16")
DRY = dict(base="vit_small_patch14_dinov2", large="vit_small_patch14_dinov2", giant="vit_small_patch14_dinov2",
           img_size=112, views=2, batch=2, steps=1, warmup=1, run_steps=9, precision="fp32")


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


def overrides(s: dict, name: str, weights: Path, *extra: str) -> list[str]:
    return [f"model.name={name}", f"model.checkpoint={weights}", f"model.img_size={s['img_size']}",
            f"views.num={s['views']}", f"train.batch_size={s['batch']}", f"train.precision={s['precision']}",
            "data.num_workers=4", "data.root=null", *extra]


def throughput(s: dict, weights: Path, cpu: bool, tmp: Path) -> dict:
    """bench_distill on the paper's DINOv2-B setting, with TFLOP/s and MFU for every phase."""
    argv = [RECIPE, *overrides(s, s["base"], weights), "--steps", str(s["steps"]), "--warmup", str(s["warmup"]),
            "--compile", "--json", str(tmp / "bench.json")] + (["--cpu"] if cpu else [])
    b = bench_distill.main(argv)
    flops = b["gflops_per_image_step"]
    per_phase = dict(step=flops["teacher"] + flops["student"], reference=flops["teacher"] + flops["student"],
                     step_compiled=flops["teacher"] + flops["student"], student=flops["student"],
                     student_compiled=flops["student"], teacher=flops["teacher"])
    peak = next((v for k, v in bench_distill.PEAK_BF16.items() if k in b["device"]), None)
    phases = {}
    for phase, gflops in per_phase.items():
        r = b[phase]
        tflops = gflops * r["images_per_s"] / 1e3
        phases[phase] = dict(images_per_s=r["images_per_s"], tflops=round(tflops, 2),
                             mfu=round(tflops / peak, 3) if peak else None, peak_memory_mb=r["peak_memory_mb"])
    return dict(device=b["device"], peak_bf16_tflops=peak, gflops_per_image_step=flops,
                speedup_step_vs_reference=b["speedup_step_vs_reference"],
                compile_first_call_s=b["step_compiled"].get("first_call_s"), loader_images_per_s=b["loader"],
                phases=phases)


def peak_memory(s: dict, name: str, weights: Path, device: torch.device) -> dict:
    """Allocator peak of one fresh-view training step (MB), plain and, if that does not fit, checkpointed."""
    from accelerate.state import AcceleratorState, GradientState

    from phreg.data import ImageDataset, collate, scan_images
    from phreg.distill.step import build_parts, make_accelerator, train_step
    from phreg.recipe import load_recipe

    out = {}
    for ckpt in ("false", "true"):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        recipe = load_recipe(RECIPE, overrides(s, name, weights, f"speed.grad_checkpointing={ckpt}",
                                               "speed.compile=false", "train.lr=1e-3", "train.end_lr=1e-4",
                                           "train.batch_size=4", "cache.enabled=true", "cache.plans=1"))
        acc = make_accelerator(recipe, cpu=device.type == "cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            parts = build_parts(recipe, acc.device, "bf16" if acc.mixed_precision == "bf16" else "fp32")
            model, optimizer = acc.prepare(parts.student_tokens, parts.optimizer)
            files, _ = scan_images(None)
            data = ImageDataset(files, s["img_size"], parts.mean, parts.std, train=True,
                                make_plan=parts.targets.plan_fn())
            batch = collate([data[(0, i % len(data))] for i in range(s["batch"])])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            for _ in range(2):  # the second step holds AdamW's moments too
                loss, _ = train_step(acc, model, parts.targets, optimizer, parts.params, batch, recipe.train)
            bench_distill.sync(device)
            out["grad_checkpointing" if ckpt == "true" else "plain"] = dict(
                peak_mb=round(bench_distill.peak_memory_mb(device), 0), loss=round(float(loss), 4),
                parameters_m=round(sum(p.numel() for p in parts.targets.teacher.parameters()) / 1e6, 1))
            if ckpt == "false":
                break
        except torch.OutOfMemoryError:
            out["grad_checkpointing" if ckpt == "true" else "plain"] = "out of memory"
        finally:
            parts = model = optimizer = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def loss_run(s: dict, weights: Path, cpu: bool, tmp: Path) -> dict:
    """`phreg distill` for a few steps on the embedded photos: the loss must fall. Every step sees all four photos
    (batch 4) with the same crops and views (a one-plan target cache), at lr 1e-3: with fresh views each step the
    change of targets from step to step is larger than what a few steps learn."""
    from accelerate.state import AcceleratorState, GradientState

    from phreg.distill.loop import distill
    from phreg.recipe import load_recipe

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    recipe = load_recipe(RECIPE, overrides(s, s["base"], weights, f"output_dir={tmp / 'run'}",
                                           f"train.max_steps={s['run_steps']}", "train.log_every=1",
                                           "train.save_every=0", "data.val_split=0", "data.val_root=null",
                                           "speed.compile=false", "train.lr=1e-3", "train.end_lr=1e-4",
                                           "train.batch_size=4", "cache.enabled=true", "cache.plans=1"))
    t0 = time.perf_counter()
    run = distill(recipe, cpu=cpu, quiet=True)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    k = max(1, len(losses) // 3)  # first third vs last third: each step sees other crops and views
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    return dict(steps=len(losses), wall_s=round(time.perf_counter() - t0, 1), loss_first=round(first, 4),
                loss_last=round(last, 4), falls=last < first, losses=[round(x, 4) for x in losses])


def projection(t: dict, plans: int) -> dict:
    """H100-hours of 100 epochs of Flickr30k, from measured rates (scaled by peak when the device is not an H100)."""
    scale = (t["peak_bf16_tflops"] or H100_PEAK) / H100_PEAK
    p = t["phases"]
    fresh = max(p["step"]["images_per_s"], p["step_compiled"]["images_per_s"])
    student = max(p["student"]["images_per_s"], p["student_compiled"]["images_per_s"])
    images = FLICKR30K_IMAGES * EPOCHS
    fresh_h = images / fresh / 3600 * scale
    build_h = plans * FLICKR30K_IMAGES / p["teacher"]["images_per_s"] / 3600 * scale
    cached_h = build_h + images / student / 3600 * scale
    return dict(images=FLICKR30K_IMAGES, epochs=EPOCHS, cache_plans=plans, device_to_h100_scale=round(scale, 3),
                fresh_views_h100_hours=round(fresh_h, 2), cached_h100_hours=round(cached_h, 2),
                cache_build_h100_hours=round(build_h, 2), paper_gpu_hours=150)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_suite.json")
    ap.add_argument("--dry-run", action="store_true", help="every part on the CPU with a tiny setting")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu_suite: no CUDA GPU on this machine; nothing measured (--dry-run runs a tiny CPU version)")
        return 0
    s = DRY if args.dry_run else FULL
    cpu = not torch.cuda.is_available() or args.dry_run
    device = torch.device("cpu" if cpu else "cuda")
    began = time.perf_counter()
    result = dict(suite="phreg gpu_suite", dry_run=args.dry_run, settings=s, torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M:%S"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = random_weights(s["base"], tmp, device)
        result["throughput"] = throughput(s, base, cpu, tmp)
        result["run"] = loss_run(s, base, cpu, tmp)
        result["projection"] = projection(result["throughput"], plans=4)
        result["peak_memory"] = {}
        for key in ("large", "giant"):
            weights = random_weights(s[key], tmp, device)
            result["peak_memory"][key] = dict(model=s[key], **peak_memory(s, s[key], weights, device))
            weights.unlink()
    result["wall_s"] = round(time.perf_counter() - began, 1)
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    print(f"gpu_suite: wrote {args.out} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
