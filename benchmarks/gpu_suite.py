"""phreg on one GPU, in one JSON, in at most 8 minutes: what `benchmarks/gpu_suite.sh` runs (README "Performance").

    python benchmarks/gpu_suite.py [--out FILE] [--dry-run] [--parts NAME[,NAME...]]

Random-init weights (real ones do not travel), photos cut from the embedded ones, and the paper's DINOv2-B setting:
518 px, 10 views, batch 8, bf16. Every part runs in its own process (`gpu_suite.py --part NAME`, in a session of its
own) with a fixed wall-clock budget. A part still running at its budget gets SIGTERM and, 2 s later, SIGKILL for
every process of its session (a compile that never yields to a signal, data workers and a `phreg distill` run
alike); it is recorded as cut, with what it had measured, and the next part runs. A part writes its own JSON as it
measures; the suite's JSON is rewritten after every part, so a suite cut short still returns what it measured. The
parts, most important first, with their budgets (440 s in all: with process start-up and kill grace the suite ends
within 8 minutes on one H100/H200, every model load and compile included):

    part                 budget s  measures                                                                 dry run
    inputs                     20  DINOv2-B random weights, 256 photos                                        CPU
    bench                     105  bench_distill, eager and compiled: teacher alone, student on given        meta
                                   targets, fresh-view step vs the reference step, step_compiled; MFU
    loader                     25  bench_loader: distill's loader, 518 px, B/14 target shape, 8 workers,     CPU
                                   onto the GPU
    distill                   100  `phreg distill` end to end in a subprocess: fresh eager, fresh compiled,  CPU
                                   cached (with its build); steady images/s from metrics.jsonl; vs train_step
    projection                  8  hours of the paper's recipe, fresh and cached (build included)             -
    sync_check                 15  3 steps under torch.cuda.set_sync_debug_mode("error"), fresh and cached   meta
    levers.frozen_dtype        15  speed.frozen_dtype=bf16 vs fp32 weights under autocast                     CPU
    levers.sdpa                15  SDPA backend (sdpa_kernel): flash, cuDNN, efficient vs torch's choice     meta
    levers.chunk               15  views.chunk 40 and 80 (all views of a batch) vs auto                       meta
    levers.compile_mode        45  speed.compile_mode=reduce-overhead (CUDA graphs) vs default                meta
    levers.fp8                 12  torchao float8 teacher vs bf16 weights (skipped without torchao)          CPU
    memory.large               25  allocator peak of 2 steps of ViT-L/14                                      meta
    memory.giant               40  allocator peak of 2 steps of ViT-g/14                                      meta

A lever is measured on and off in one process on the same inputs, timed interleaved: the teacher alone (views/s)
and, where it applies, the fresh-view step (images/s); each is a row with both figures and the ratio on/off. Levers
go through public torch APIs and existing recipe keys only; the float8 one also records the cosine similarity of its
targets to the bf16 ones (kept only at >= 0.999 and faster). One inductor cache per suite run, made fresh: `bench`
compiles cold (its first call is the cold compile), and later parts compiling the same graphs hit that cache, as a
user's second run does.

MFU: images/s x FLOPs per image-step (ViT-B/14, 518 px, 10 views, FlopCounterMode on the reference step: 3,031.5
GFLOP teacher + 705.4 student) over the device's dense bf16 peak (H100/H200: 989 TFLOP/s). Projection: 100 epochs
of Flickr30k (31,783 images); fresh at each end-to-end fresh rate; cached as the recipe's cache.plans plans per image
built at the slower of the teacher alone (bench) and the cache writer (loader's build), which the build overlaps,
plus the epochs at the cached end-to-end rate. Targets: fresh <= 7.5 h, cached with its build <= 2 h.

Dry run (`--dry-run`, or `PHREG_GPU_SUITE_DRY=1 bash benchmarks/gpu_suite.sh`): every part, tiny (DINOv2-S at 56 px,
2 views, batch 2, fp32, one thread). The parts marked meta put the models, and the batches they consume, on
PyTorch's `meta` device while the data is made on the CPU as on a GPU run, so a tensor that mixes the models' device
with the CPU, or reads a value back, raises on a machine without a GPU. Figures from meta mean nothing: the dry run
checks code paths, shapes and the JSON. What meta cannot do, and how each is handled:
  * `phreg distill` and bench_loader are processes that compute for real: they run tiny on the CPU;
  * bf16 frozen weights need autocast, which meta lacks: levers.frozen_dtype and levers.fp8 run tiny on the CPU;
  * registers start from randn (model.register_init=randn): the default init reads the teacher's weights' values;
  * fused AdamW is let onto meta and nonzero() there assumes every element nonzero (`meta_device.meta_allowances`,
    nothing else); reference.py skips its NaN checks and loss.item() on meta;
  * sync_check: set_sync_debug_mode is CUDA's; on meta every read-back raises by itself.
Without a GPU and without --dry-run it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import phreg  # noqa: E402
from phreg.files.atomic import atomic_dir, write_json  # noqa: E402

REPO = Path(phreg.__file__).resolve().parents[1]  # the checkout whose phreg runs (PYTHONPATH)
RECIPE = str(REPO / "recipes" / "dinov2_vitb14.yaml")
FLICKR30K_IMAGES, EPOCHS = 31_783, 100
TARGET_HOURS = dict(fresh=7.5, cached=2.0)
GFLOP = dict(teacher=3031.5, student=705.4)  # per image, ViT-B/14 at 518 px, 10 views (FlopCounterMode)
GRACE_S = 2.0  # SIGTERM -> SIGKILL, for every process of an overrun part's session
FULL = dict(base="vit_base_patch14_dinov2", large="vit_large_patch14_dinov2", giant="vit_giant_patch14_dinov2",
            img_size=518, views=10, batch=8, precision="bf16", steps=5, warmup=2, images=256, workers=8,
            fresh_steps=30, cached_steps=240, log_every=5, chunks=[40, 80],
            loader=["--workers", "8", "--images", "64", "--seconds", "3"], extra=[])
DRY = dict(base="vit_small_patch14_dinov2", large="vit_small_patch14_dinov2", giant="vit_small_patch14_dinov2",
           img_size=56, views=2, batch=2, precision="fp32", steps=1, warmup=1, images=8, workers=0,
           fresh_steps=6, cached_steps=6, log_every=2, chunks=[2, 4],
           loader=["--workers", "1", "--images", "8", "--seconds", "0.5"], extra=["model.register_init=randn"])


# ------------------------------------------------------------------------------------------------ running a part
def members(leader: int, session: bool) -> list[int]:
    """Live processes of `leader`'s session (or process group), from /proc; zombies left out (they are dead)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group, sid = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue
        if int(sid if session else group) == leader and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def stop(proc: subprocess.Popen, session: bool, grace: float = GRACE_S) -> None:
    """End `proc` and everything it started: SIGTERM to every live process of its session (or process group), then
    SIGKILL to whatever is left `grace` s later. Done after every run, ended or cut, so that no data worker or child
    run of a part outlives it (a `phreg distill` run inside a part has a process group of its own, in the part's
    session)."""
    def signal_all(sig) -> list[int]:
        pids = members(proc.pid, session) if Path("/proc/self/stat").exists() else []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        return pids

    if signal_all(signal.SIGTERM) or proc.poll() is None:
        end = time.time() + grace
        while time.time() < end and (proc.poll() is None or members(proc.pid, session)):
            time.sleep(0.05)
    for _ in range(20):
        if not signal_all(signal.SIGKILL):
            break
        time.sleep(0.05)
    proc.wait()


def run_boxed(cmd: list[str], seconds: float, log: Path, env: dict | None = None, grace: float = GRACE_S,
              session: bool = True) -> int | None:
    """`cmd` for at most `seconds` of wall clock, its output appended to `log`, in a session of its own (a part), or
    with `session=False` in a process group of its own within this session (a run inside a part, so that the part's
    end takes it along). Returns its exit code, or None when it was cut."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        alone = dict(start_new_session=True) if session else \
            dict(process_group=0) if sys.version_info >= (3, 11) else dict(preexec_fn=os.setpgrp)
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, **alone)
        try:
            return proc.wait(timeout=max(0.1, seconds))
        except subprocess.TimeoutExpired:
            return None
        finally:
            stop(proc, session, grace)


def log_tail(log: Path, lines: int = 25) -> list[str]:
    try:
        return log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def place(result: dict, name: str, data: dict) -> None:
    """`levers.sdpa` goes to result["levers"]["sdpa"]."""
    *outer, last = name.split(".")
    for key in outer:
        result = result.setdefault(key, {})
    result[last] = data


def run_part(result: dict, out: Path, name: str, cmd: list[str], budget: float, part_json: Path, log: Path,
             env: dict | None = None, grace: float = GRACE_S) -> dict:
    """One part in its own process for at most `budget` s; its JSON (what it emitted, even when cut) goes into
    `result`, with its status (ok / cut / error), and `out` is rewritten at once."""
    began = time.perf_counter()
    rc = run_boxed(cmd, budget, log, env, grace)
    try:
        data = json.loads(part_json.read_text())
    except (OSError, ValueError):
        data = {}
    error, where = data.pop("error", None), data.pop("where", None)
    status = dict(status="ok", seconds=round(time.perf_counter() - began, 1), budget_s=budget)
    if rc is None:
        status.update(status="cut", log_tail=log_tail(log))
    elif rc or error:
        lines = log_tail(log)
        status.update(status="error", error=error or next((ln for ln in reversed(lines) if ln.strip()),
                                                          f"exit code {rc}"), where=where, log_tail=lines)
    status["headline"] = headline(name, data, status)
    place(result, name, data)
    result.setdefault("parts", {})[name] = status
    write_json(out, result)
    return status


# ------------------------------------------------------------------------------------------------ inside a part
@dataclass
class Ctx:
    """What a part process knows: its settings, the suite's work folder, where its models go, its budget."""
    s: dict
    work: Path
    out: Path
    dry: bool
    device: torch.device
    deadline: float  # time.time() at which the orchestrator cuts this part
    suite: Path | None = None
    data: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.time()

    def emit(self, **figures) -> None:
        """Record figures now: a part cut later keeps them."""
        self.data.update(figures)
        write_json(self.out, self.data)

    def so_far(self) -> dict:
        """The suite's JSON as the parts before this one left it."""
        return json.loads(self.suite.read_text()) if self.suite and self.suite.is_file() else {}


def overrides(s: dict, name: str, weights: Path, *extra: str) -> list[str]:
    return [f"model.name={name}", f"model.checkpoint={weights}", f"model.img_size={s['img_size']}",
            f"views.num={s['views']}", f"train.batch_size={s['batch']}", f"train.precision={s['precision']}",
            f"data.num_workers={s['workers']}", "data.val_split=0", "data.val_root=null", *s["extra"], *extra]


def random_weights(name: str, folder: Path, device: torch.device) -> Path:
    """A random-init checkpoint of `name` (initialized on the device: a 1.1B model in seconds), written once."""
    import safetensors.torch
    import timm

    path = folder / f"{name}.safetensors"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, device=device)
        part = path.with_name(f".{path.name}.part")
        safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, part)
        os.replace(part, path)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return path


def inputs(ctx: Ctx) -> tuple[Path, Path]:
    """The base model's random weights and the photos: made by `inputs`, or by the first part that needs them."""
    from bench_loader import make_photos

    weights = random_weights(ctx.s["base"], ctx.work, torch.device("cuda" if not ctx.dry else "cpu"))
    photos = ctx.work / "photos"
    if not photos.is_dir():
        with atomic_dir(photos) as tmp:
            make_photos(tmp, ctx.s["images"], ctx.s["img_size"])
    return weights, photos


def peak_tflops() -> float | None:
    """The GPU's dense bf16 TFLOP/s for MFU (bench_distill's table); None without one."""
    if not torch.cuda.is_available():
        return None
    from bench_distill import PEAK_BF16

    return next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name()), None)


def mfu(images_per_s: float | None, gflop: float, peak: float | None) -> float | None:
    return round(images_per_s * gflop / 1e3 / peak, 3) if images_per_s and peak else None


@dataclass
class Rig:
    """One training setting built as `phreg distill` builds it (recipe, Accelerator, parts, the prepared student and
    optimizer) and one batch, made on the CPU and moved to the models' device as the loader hands it over."""
    recipe: object
    acc: object
    parts: object
    model: torch.nn.Module
    optimizer: object
    batch: dict
    images: torch.Tensor

    @classmethod
    def build(cls, ctx: Ctx, *extra: str, name: str | None = None, weights: Path | None = None, acc=None) -> "Rig":
        from phreg.config.recipe import load_recipe
        from phreg.data.images import ImageDataset, collate
        from phreg.data.scan import scan_images
        from phreg.distill.step import build_parts, make_accelerator

        base, photos = inputs(ctx)
        recipe = load_recipe(RECIPE, overrides(ctx.s, name or ctx.s["base"], weights or base, f"data.root={photos}",
                                               "speed.compile=false", *extra))
        acc = acc or make_accelerator(recipe, cpu=ctx.device.type != "cuda")
        parts = build_parts(recipe, ctx.device, "bf16" if acc.mixed_precision == "bf16" else "fp32")
        # build_parts placed the models; Accelerate must not move them (to its CPU, from `meta`)
        model, optimizer = acc.prepare(parts.student_tokens, parts.optimizer, device_placement=[False, False])
        data = ImageDataset(scan_images(photos)[0], recipe.model.img_size, parts.mean, parts.std, recipe.seed,
                            train=True, make_plan=parts.targets.plan_fn())
        loaded = collate([data[(0, i % len(data))] for i in range(recipe.train.batch_size)])
        cuda = ctx.device.type == "cuda"
        batch = {k: (v.pin_memory() if cuda else v).to(ctx.device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in loaded.items()}
        return cls(recipe, acc, parts, model, optimizer, batch, parts.targets.normalize(batch["pixels"]))

    def teacher(self) -> torch.Tensor:
        return self.parts.targets(self.images, self.batch["plan"])

    def step(self, batch: dict | None = None):
        from phreg.distill.step import train_step

        return train_step(self.acc, self.model, self.parts.targets, self.optimizer, self.parts.params,
                          batch or self.batch, self.recipe.train)


def timed(ctx: Ctx, fns: dict[str, Callable], per: int) -> dict[str, float]:
    """Interleaved medians (bench_distill.timed_pair) as rates: `per` items per call."""
    from bench_distill import timed_pair

    seconds = timed_pair(fns, ctx.device, ctx.s["steps"], ctx.s["warmup"])
    return {k: round(per / v, 2) for k, v in seconds.items()}


def rows(off: str, rates: dict[str, float], key: str, table: dict) -> dict:
    """Lever rows in `table`, one per setting other than `off`: the rate (`key`) off and on, and the ratio on/off."""
    for on, rate in rates.items():
        if on != off:
            table.setdefault(on, dict(off=off))[key] = dict(off=rates[off], on=rate, ratio=round(rate / rates[off], 3))
    return table


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict | None:
    """Cosine similarity per token of two target sets (mean, min); None where values cannot be read (meta)."""
    from meta_device import readable

    if not readable(a):
        return None
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return dict(mean=round(cos.mean().item(), 6), min=round(cos.min().item(), 6))


def part_inputs(ctx: Ctx) -> None:
    from bench_distill import device_name

    weights, photos = inputs(ctx)
    ctx.emit(model=ctx.s["base"], weights_mb=round(weights.stat().st_size / 2**20), photos=len(list(photos.iterdir())),
             device=device_name(torch.device("cuda")) if not ctx.dry else "CPU and meta (dry run)",
             torch=torch.__version__, cuda=torch.version.cuda, peak_bf16_tflops=peak_tflops(),
             torchao=importlib.util.find_spec("torchao") is not None)


def part_bench(ctx: Ctx) -> None:
    import bench_distill

    s, peak = ctx.s, peak_tflops()
    weights, photos = inputs(ctx)
    argv = [RECIPE, *overrides(s, s["base"], weights, f"data.root={photos}"), "--steps", str(s["steps"]),
            "--warmup", str(s["warmup"]), "--compile"] + (["--meta"] if ctx.dry else [])
    b = bench_distill.main(argv, progress=lambda partial: ctx.emit(**bench_figures(partial, peak)))
    ctx.emit(**bench_figures(b, peak))


def bench_figures(b: dict, peak: float | None) -> dict:
    both = GFLOP["teacher"] + GFLOP["student"]
    gflop = dict(teacher=GFLOP["teacher"], teacher_compiled=GFLOP["teacher"], student=GFLOP["student"],
                 student_compiled=GFLOP["student"], step=both, reference=both, step_compiled=both)
    phases = {p: {k: b[p][k] for k in ("images_per_s", "views_per_s", "peak_memory_mb") if k in b[p]}
              | dict(mfu=mfu(b[p]["images_per_s"], g, peak)) for p, g in gflop.items() if p in b}
    out = dict(device=b["device"], precision=b["precision"], phases=phases,
               counted_gflops_per_image_step=b.get("gflops_per_image_step"),
               targets_max_abs_diff=b.get("targets_max_abs_diff"),
               speedup_step_vs_reference=b.get("speedup_step_vs_reference"))
    if "step_compiled" in b:
        out["compile_first_call_s"] = b["step_compiled"].get("first_call_s")
        out["compiled_vs_eager_step"] = round(b["step_compiled"]["images_per_s"] / b["step"]["images_per_s"], 3)
    if "loader" in b:
        out["loader"] = b["loader"]
    return out


def part_loader(ctx: Ctx) -> None:
    import bench_loader

    s = ctx.s
    argv = ["--model", s["base"], "--img-size", str(s["img_size"]), "--batch", str(s["batch"]),
            "--views", str(s["views"]), *s["loader"]] + (["--cpu"] if ctx.device.type != "cuda" else [])
    ctx.emit(**bench_loader.main(argv))


def steady_rate(metrics: Path, batch: int, skip: int = 2) -> float | None:
    """Images/s between the `skip`-th logged step and the last (warm-up and compilation left out)."""
    if not metrics.is_file():
        return None
    rows_ = [r for r in map(json.loads, metrics.read_text().splitlines()) if "step" in r and "loss" in r]
    if len(rows_) <= skip:
        return None
    a, b = rows_[skip - 1] if skip else dict(step=0, elapsed_s=0.0), rows_[-1]
    return round((b["step"] - a["step"]) * batch / max(b["elapsed_s"] - a["elapsed_s"], 1e-9), 2)


def part_distill(ctx: Ctx) -> None:
    """`phreg distill` as a user runs it, three times (the dry run skips the compiled one), each in its own process
    and time box (its share of what is left); a run cut short still gives its steady rate from the metrics it
    logged."""
    from phreg.config.recipe import load_recipe
    from phreg.distill.speed import use_compile

    s = ctx.s
    weights, photos = inputs(ctx)
    auto = use_compile(load_recipe(RECIPE, []).speed, ctx.device)  # what the recipe's speed.compile=auto does here
    runs = [("fresh_eager", s["fresh_steps"], ["cache.enabled=false", "speed.compile=false"], False, 0.22),
            ("fresh_compiled", s["fresh_steps"], ["cache.enabled=false", "speed.compile=true"], True, 0.38),
            ("cached", s["cached_steps"], ["cache.enabled=true", "cache.plans=1"], auto, 0.40)]
    phases = ctx.so_far().get("bench", {}).get("phases", {})
    peak = peak_tflops()
    for i, (name, steps, extra, compiled, share) in enumerate(runs):
        if ctx.dry and compiled:  # the dry run checks this part's plumbing, which fresh_eager's run goes through
            ctx.emit(**{name: dict(skipped="dry run: a compile on the CPU would take a minute of its four")})
            continue
        shares = sum(r[-1] for r in runs[i:] if not (ctx.dry and r[3]))
        seconds = ctx.left() * share / shares - 2  # 2 s to record it before the part's end
        run = ctx.work / "runs" / name
        cmd = [sys.executable, "-m", "phreg", "distill", RECIPE,
               *overrides(s, s["base"], weights, f"data.root={photos}"), f"output_dir={run}", "train.save_every=0",
               f"train.log_every={s['log_every']}", f"train.max_steps={steps}", *extra, "--quiet"]
        cmd += ["--cpu"] if ctx.device.type != "cuda" else []
        log = ctx.work / "logs" / f"distill.{name}.log"
        t0 = time.perf_counter()
        rc = run_boxed(cmd, seconds, log, session=False)
        row = dict(compiled=compiled, steps_asked=steps, wall_s=round(time.perf_counter() - t0, 1),
                   images_per_s=steady_rate(run / "metrics.jsonl", s["batch"]))
        if rc is None:
            row["status"] = f"cut at {seconds:.0f} s"
        elif rc:
            row.update(status="error", error=next((ln for ln in reversed(log_tail(log)) if ln.strip()), f"exit {rc}"))
        else:
            summary = json.loads((run / "summary.json").read_text())
            row.update(status="ok", cache_s=summary["timings"]["cache_s"], train_s=summary["timings"]["train_s"],
                       steps=summary["steps"], images=summary["images_seen"])
            if name == "cached":
                row["cache_images"] = s["images"]  # one plan per image
        phase = ("student" if name == "cached" else "step") + ("_compiled" if compiled else "")
        if row["images_per_s"]:
            row["mfu"] = mfu(row["images_per_s"], GFLOP["student"] if name == "cached" else sum(GFLOP.values()), peak)
            if phases.get(phase, {}).get("images_per_s"):  # the loop against its own step, same setting
                row["loop_vs_train_step"] = round(row["images_per_s"] / phases[phase]["images_per_s"], 3)
                row["train_step_phase"] = phase
        shutil.rmtree(run, ignore_errors=True)  # the export and the cache: hundreds of MB
        ctx.emit(**{name: row})


def projection(d: dict, plans: int) -> dict:
    """Hours of 100 epochs of Flickr30k at the measured rates (see the module's docstring)."""
    image_steps = FLICKR30K_IMAGES * EPOCHS
    out = dict(images=FLICKR30K_IMAGES, epochs=EPOCHS, image_steps=image_steps, target_hours=TARGET_HOURS,
               cache_plans=plans)
    distill = d.get("distill") or {}
    fresh = {k.removeprefix("fresh_"): round(image_steps / r["images_per_s"] / 3600, 2)
             for k in ("fresh_eager", "fresh_compiled") if (r := distill.get(k) or {}).get("images_per_s")}
    if fresh:
        out["fresh_hours"] = fresh
        out["fresh_met"] = min(fresh.values()) <= TARGET_HOURS["fresh"]
    cached = distill.get("cached") or {}
    phases = (d.get("bench") or {}).get("phases", {})
    teacher = next((phases[p]["images_per_s"] for p in (("teacher_compiled", "teacher") if cached.get("compiled")
                                                        else ("teacher", "teacher_compiled")) if p in phases), None)
    writer = ((d.get("loader") or {}).get("build") or {}).get("images_per_s")
    if cached.get("images_per_s") and teacher and writer:
        build_rate = min(teacher, writer)
        build_h = plans * FLICKR30K_IMAGES / build_rate / 3600
        out.update(cache_build_images_per_s=build_rate, cache_build_hours=round(build_h, 2),
                   cached_hours=round(build_h + image_steps / cached["images_per_s"] / 3600, 2))
        out["cached_met"] = out["cached_hours"] <= TARGET_HOURS["cached"]
    if cached.get("cache_s"):
        out["cache_build_measured"] = dict(images=cached.get("cache_images"), seconds=cached["cache_s"],
                                           note="one plan per image, start-up and the teacher's compile included")
    return out


def part_projection(ctx: Ctx) -> None:
    from phreg.config.recipe import load_recipe

    p = projection(ctx.so_far(), load_recipe(RECIPE, []).cache.plans)
    ctx.emit(**p)
    print(headline("projection", p, {}))


def part_sync_check(ctx: Ctx) -> None:
    """A warm-up step (lazy inits may sync), then 3 eager steps, fresh views and cached targets, where a host sync
    raises: CUDA's set_sync_debug_mode("error"), or on meta any read-back."""
    r = Rig.build(ctx)
    cached = dict(r.batch, target=r.teacher())
    for name, batch in (("fresh_views", r.batch), ("cached_targets", cached)):
        r.step(batch)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                r.step(batch)
            ctx.emit(**{name: "no host sync in 3 steps"})
        except (RuntimeError, NotImplementedError) as e:
            frames = [f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_tb(e.__traceback__)]
            ctx.emit(**{name: dict(error=str(e).splitlines()[0], where=frames[-6:])})
        finally:
            if ctx.device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)


def compare(ctx: Ctx, off: str, fns: dict[str, Callable], key: str, per: int) -> None:
    """Time `fns` interleaved and add their rows against `off` under `key`; emitted at once."""
    table = ctx.data.setdefault("rows", {})
    rows(off, timed(ctx, fns, per), key, table)
    ctx.emit(rows=table)


def compare_rigs(ctx: Ctx, rigs: dict[str, Rig], off: str, what: tuple[str, ...] = ("teacher", "step")) -> None:
    """The teacher alone (views/s), then the fresh-view step (images/s), of each rig, against `off`."""
    r = next(iter(rigs.values()))
    b, v = r.recipe.train.batch_size, r.recipe.views.num
    for w in what:
        compare(ctx, off, {k: getattr(x, w) for k, x in rigs.items()},
                "teacher_views_per_s" if w == "teacher" else "step_images_per_s", b * v if w == "teacher" else b)


def part_frozen_dtype(ctx: Ctx) -> None:
    """bf16 frozen weights, shared by teacher and student, against fp32 weights under bf16 autocast (the default)."""
    off = Rig.build(ctx, "train.precision=bf16", "speed.frozen_dtype=fp32")
    on = Rig.build(ctx, "train.precision=bf16", "speed.frozen_dtype=bf16", acc=off.acc)
    weights_mb = {k: round(sum(p.numel() * p.element_size() for p in r.parts.targets.teacher.parameters()) / 2**20)
                  for k, r in (("fp32", off), ("bf16", on))}
    ctx.emit(frozen_weights_mb=weights_mb, targets_cosine=agreement(off.teacher(), on.teacher()))
    compare_rigs(ctx, {"speed.frozen_dtype=fp32": off, "speed.frozen_dtype=bf16": on}, "speed.frozen_dtype=fp32")


def part_sdpa(ctx: Ctx) -> None:
    """The SDPA backend pinned with torch.nn.attention.sdpa_kernel around the teacher and the step, against torch's
    own choice. A backend this build or device cannot run is recorded as such."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    r = Rig.build(ctx)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}

    def under(backend, fn):
        def call():
            with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                return fn()
        return call

    usable, failed = {"default": None}, {}
    for name, backend in backends.items():
        try:
            under(backend, r.teacher)()
            usable[name] = backend
        except Exception as e:  # this backend cannot run here (kernel missing, shape unsupported): recorded as such
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    ctx.emit(unusable=failed)
    b, v = r.recipe.train.batch_size, r.recipe.views.num
    compare(ctx, "default", {k: under(x, r.teacher) for k, x in usable.items()}, "teacher_views_per_s", b * v)
    compare(ctx, "default", {k: under(x, r.step) for k, x in usable.items()}, "step_images_per_s", b)


def part_chunk(ctx: Ctx) -> None:
    """Views per teacher forward: larger chunks than auto picks, up to all views of a batch."""
    auto = Rig.build(ctx, "views.chunk=0")
    rigs = {"views.chunk=0": auto} | {f"views.chunk={n}": Rig.build(ctx, f"views.chunk={n}", acc=auto.acc)
                                       for n in ctx.s["chunks"]}
    ctx.emit(auto_chunk=auto.parts.targets.chunk(ctx.device))
    compare_rigs(ctx, rigs, "views.chunk=0")


def part_compile_mode(ctx: Ctx) -> None:
    """reduce-overhead (CUDA graphs) against the default compile mode, both compiled; the first calls (compiles)
    timed apart, the teacher first, then the step."""
    on_ = "speed.compile_mode=reduce-overhead"
    rigs = {"speed.compile_mode=default": Rig.build(ctx, "speed.compile=true")}
    rigs[on_] = Rig.build(ctx, "speed.compile=true", on_, acc=rigs["speed.compile_mode=default"].acc)
    first = {}
    for what in ("teacher", "step"):
        for name, r in rigs.items():
            t0 = time.perf_counter()
            getattr(r, what)()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            first[f"{what} {name}"] = round(time.perf_counter() - t0, 1)
            ctx.emit(first_call_s=first)
        compare_rigs(ctx, rigs, "speed.compile_mode=default", (what,))


def part_fp8(ctx: Ctx) -> None:
    """The frozen teacher in float8 (torchao's dynamic float8 inference quantization of its linear layers, per row)
    against the same teacher in bf16 weights: speed, and the cosine similarity of the targets on the same images."""
    if importlib.util.find_spec("torchao") is None:
        ctx.emit(skipped="torchao not installed")
        return
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    from phreg.targets.teacher import DenoisedTeacher

    off = Rig.build(ctx, "train.precision=bf16", "speed.frozen_dtype=bf16")
    t, m = off.parts.targets, off.recipe.model
    # placed first, then quantized in place: the student keeps the bf16 tensors it shares with the teacher
    targets = DenoisedTeacher(copy.deepcopy(t.teacher), off.recipe.views, off.parts.mean, off.parts.std, t.autocast,
                              head=m.teacher_head, sigma=m.naclip_sigma, batch=off.recipe.train.batch_size)
    quantize_(targets.to(ctx.device).teacher, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    on = copy.copy(off)
    on.parts = copy.copy(off.parts)
    on.parts.targets = targets
    cosine = agreement(off.teacher(), on.teacher())
    ctx.emit(targets_cosine=cosine)
    compare_rigs(ctx, {"bf16": off, "float8": on}, "bf16")
    row = ctx.data["rows"]["float8"]
    ctx.emit(keep=bool(cosine and cosine["mean"] >= 0.999 and row["teacher_views_per_s"]["ratio"] > 1))


def part_memory(ctx: Ctx, key: str) -> None:
    """Allocator peak of two steps (AdamW moments included) of one model at the suite's setting, fresh views."""
    from bench_distill import peak_memory_mb, sync

    name = ctx.s[key]
    base, _ = inputs(ctx)
    own = name != ctx.s["base"]  # the dry run's stand-ins are the base model: its weights are there already
    weights = random_weights(name, ctx.work / key, torch.device("cuda" if not ctx.dry else "cpu")) if own else base
    try:
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = Rig.build(ctx, name=name, weights=weights)
        for _ in range(2):
            r.step()
        sync(ctx.device)
        ctx.emit(model=name, peak_mb=round(peak_memory_mb(ctx.device)), chunk=r.parts.targets.chunk(ctx.device),
                 parameters_m=round(sum(p.numel() for p in r.parts.targets.teacher.parameters()) / 1e6, 1))
    finally:
        if own:
            weights.unlink(missing_ok=True)


@dataclass(frozen=True)
class Part:
    name: str
    budget: float  # seconds on a GPU
    dry_budget: float  # seconds in the dry run (2 CPU cores)
    dry_device: str  # where the dry run puts its models: meta, or the CPU for what computes for real
    fn: Callable[[Ctx], None]


PARTS = [Part("inputs", 20, 30, "cpu", part_inputs),
         Part("bench", 105, 90, "meta", part_bench),
         Part("loader", 25, 45, "cpu", part_loader),
         Part("distill", 100, 80, "cpu", part_distill),
         Part("projection", 8, 20, "cpu", part_projection),
         Part("sync_check", 15, 30, "meta", part_sync_check),
         Part("levers.frozen_dtype", 15, 40, "cpu", part_frozen_dtype),
         Part("levers.sdpa", 15, 30, "meta", part_sdpa),
         Part("levers.chunk", 15, 30, "meta", part_chunk),
         Part("levers.compile_mode", 45, 60, "meta", part_compile_mode),
         Part("levers.fp8", 12, 20, "cpu", part_fp8),
         Part("memory.large", 25, 30, "meta", lambda ctx: part_memory(ctx, "large")),
         Part("memory.giant", 40, 30, "meta", lambda ctx: part_memory(ctx, "giant"))]
BY_NAME = {p.name: p for p in PARTS}


# ------------------------------------------------------------------------------------------------ the table
def _n(x, fmt: str = ".1f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def headline(name: str, d: dict, status: dict) -> str:
    """One line per part for the final table: its main figure, or why it has none."""
    if status.get("status") == "error":
        return str(status.get("error", ""))[:110]
    try:
        return _headline(name.split(".")[0], d) if d else "nothing measured"
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return "partial: see the JSON"


def _headline(kind: str, d: dict) -> str:
    if kind == "inputs":
        return f"{d['model']} random weights ({d['weights_mb']} MB), {d['photos']} photos; {d['device']}"
    if kind == "bench":
        p = d["phases"]
        step = lambda k: f"{_n(p[k]['images_per_s'])} (MFU {_n(p[k].get('mfu'), '.2f')})" if k in p else "-"  # noqa
        out = f"step img/s eager {step('step')}, compiled {step('step_compiled')}"
        if d.get("speedup_step_vs_reference"):
            out += f"; {d['speedup_step_vs_reference']}x the reference step"
        if "teacher" in p:
            out += f"; teacher {_n(p['teacher'].get('views_per_s'), '.0f')} views/s"
        return out
    if kind == "loader":
        rate = lambda k: _n((d.get(k) or {}).get("images_per_s"))  # noqa: E731
        return f"fresh {rate('fresh')}, cached {rate('cached')}, cache build {rate('build')} img/s; " \
               f"workers: {d.get('workers')}"
    if kind == "distill":
        return ", ".join(f"{k} {_n(r.get('images_per_s'))}" + ("" if r.get("status") == "ok" else
                                                               f" [{r.get('status', 'skipped')}]")
                         for k, r in d.items() if isinstance(r, dict)) + " img/s"
    if kind == "projection":
        parts = []
        if "fresh_hours" in d:
            parts.append(f"fresh {min(d['fresh_hours'].values())} h (<= {TARGET_HOURS['fresh']} h: "
                         f"{'met' if d['fresh_met'] else 'missed'})")
        if "cached_hours" in d:
            parts.append(f"cached {d['cached_hours']} h incl. {d['cache_build_hours']} h build "
                         f"(<= {TARGET_HOURS['cached']} h: {'met' if d['cached_met'] else 'missed'})")
        return "; ".join(parts) or "no rates to project from"
    if kind == "sync_check":
        return "; ".join(f"{k}: {v if isinstance(v, str) else v['error'][:60]}" for k, v in d.items())
    if kind == "levers":
        if "skipped" in d:
            return f"skipped: {d['skipped'].removeprefix('skipped: ')}"
        return "; ".join(f"{on}: " + ", ".join(f"{k.split('_')[0]} {v['ratio']}x" for k, v in row.items()
                                              if isinstance(v, dict)) for on, row in d.get("rows", {}).items())
    if kind == "memory":
        return f"{d['model']}: peak {d['peak_mb']:,} MB ({d['parameters_m']} M parameters)"
    return ""


def print_table(result: dict) -> None:
    parts = result.get("parts", {})
    device = (result.get("inputs") or {}).get("device") or ("CPU and meta" if result["dry_run"] else "GPU")
    print(f"\ngpu_suite{' dry run' if result['dry_run'] else ''}: {device}, torch {torch.__version__}; "
          f"{_n(result.get('wall_s'), '.0f')} s wall, {result['budget_total_s']:.0f} s of budgets")
    print(f"{'part':<21}{'status':<14}{'s':>7}{'budget':>8}  headline")
    for name, st in parts.items():
        status = dict(ok="ok", cut=f"cut at {st['budget_s']:.0f} s", error="error")[st["status"]]
        print(f"{name:<21}{status:<14}{st['seconds']:>7.1f}{st['budget_s']:>8.0f}  {st['headline']}")


# ------------------------------------------------------------------------------------------------ entry points
def selected(spec: str | None) -> list[Part]:
    if not spec:
        return PARTS
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if not any(p.name == n or p.name.startswith(n + ".") for p in PARTS)]
    if unknown:
        raise SystemExit(f"gpu_suite: no part {', '.join(unknown)} (parts: {', '.join(BY_NAME)})")
    return [p for p in PARTS if any(p.name == n or p.name.startswith(n + ".") for n in names)]


def suite(args) -> int:
    parts = selected(args.parts)
    s = DRY if args.dry_run else FULL
    budget = (lambda p: p.dry_budget) if args.dry_run else (lambda p: p.budget)
    out = Path(args.out).resolve()
    result = dict(suite="phreg gpu_suite", dry_run=args.dry_run, settings=s, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  budgets_s={p.name: budget(p) for p in parts}, budget_total_s=sum(budget(p) for p in parts))
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_suite.") as work:
        work = Path(work)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"),
                   PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        if args.dry_run:  # tiny models gain nothing from threads, and spinning ones lose to a busy neighbour 10x
            env.update(OMP_NUM_THREADS="1")
        write_json(out, result)
        try:
            for part in parts:
                print(f"gpu_suite: {part.name} (budget {budget(part):.0f} s) ...", flush=True)
                cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part.name, "--work", str(work),
                       "--json", str(work / f"{part.name}.json"), "--deadline", f"{time.time() + budget(part):.3f}",
                       "--suite", str(out)]
                st = run_part(result, out, part.name, cmd + (["--dry-run"] if args.dry_run else []), budget(part),
                              work / f"{part.name}.json", work / "logs" / f"{part.name}.log", env)
                label = dict(ok="ok", cut=f"cut at {st['budget_s']:.0f} s", error="error")[st["status"]]
                print(f"gpu_suite: {part.name} {label} in {st['seconds']:.1f} s: {st['headline']}", flush=True)
                if st["status"] != "ok" and st.get("log_tail"):
                    print("    " + "\n    ".join(st["log_tail"][-8:]), flush=True)
        except KeyboardInterrupt:
            result["interrupted"] = True
        result["wall_s"] = round(time.perf_counter() - began, 1)
        write_json(out, result)
    print_table(result)
    print(f"gpu_suite: wrote {out}")
    return 130 if result.get("interrupted") else 0


def part_process(args) -> int:
    """One part, inside its own process: what it measures goes to --json as it goes; an exception is recorded there
    (and the exit code is 1)."""
    from meta_device import meta_allowances

    part = BY_NAME[args.part]
    device = torch.device(part.dry_device if args.dry_run else "cuda")
    ctx = Ctx(dict(DRY if args.dry_run else FULL), Path(args.work), Path(args.json), args.dry_run, device,
              args.deadline, Path(args.suite) if args.suite else None)
    try:
        with meta_allowances() if device.type == "meta" else contextlib.nullcontext():
            part.fn(ctx)
        return 0
    except (Exception, SystemExit) as e:
        first = str(e).splitlines()[0][:300] if str(e) else ""
        ctx.emit(error=f"{type(e).__name__}: {first}", where=traceback.format_exc().splitlines()[-8:])
        traceback.print_exc()
        return 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_suite.json")
    ap.add_argument("--dry-run", action="store_true", help="every part tiny, models on meta or the CPU (see above)")
    ap.add_argument("--parts", help="only these parts, comma-separated (`levers` = every levers.* part)")
    ap.add_argument("--part", choices=list(BY_NAME), help=argparse.SUPPRESS)  # one part, in its own process
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)  # time.time() of the cut
    ap.add_argument("--suite", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        return part_process(args)
    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu_suite: no CUDA GPU on this machine; nothing measured (--dry-run runs a tiny version)")
        return 0
    return suite(args)


if __name__ == "__main__":
    sys.exit(main())
