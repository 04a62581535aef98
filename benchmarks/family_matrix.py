"""Every family through the real command line: random full-size weights, `phreg distill`, stock timm loads the export.

For each model: save `timm.create_model(NAME, pretrained=False)` weights to a temporary file, run
`phreg distill recipes/quickstart.yaml model.name=NAME model.checkpoint=FILE train.max_steps=2 train.log_every=1`
plus the overrides given, load `RUN/export` with `timm.create_model('local-dir:...')` and check it is the same timm
class with 16 more prefix tokens. The unlocked count is read from the unlocked table `distill` prints, the step time
from the run's own metrics.jsonl (the second step: teacher views + student forward/backward/update when
`cache.enabled=false`, student only with a target cache).

    python benchmarks/family_matrix.py [--recipe recipes/quickstart.yaml] [--models a,b] [overrides ...]
    python benchmarks/family_matrix.py --recipes recipes/deit3_b16.yaml,... train.max_steps=2 model.img_size=224 ...

With `--recipes`, each family recipe runs with its own model (random weights again).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["vit_base_patch16_clip_224.openai", "deit3_small_patch16_224", "vit_small_patch14_reg4_dinov2",
          "vit_base_patch16_siglip_224", "eva02_small_patch14_224", "vit_small_patch16_dinov3",
          "vit_pe_core_small_patch16_384"]


def step_seconds(run: Path, batch: int) -> str:
    """Seconds of the last logged step, from the run's metrics.jsonl (images/s between two log lines)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("images_per_s")]
    return f"{batch / rows[-1]['images_per_s']:.1f}" if rows else "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--recipes", help="comma-separated family recipes, each run with its own model")
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides for phreg distill")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(tempfile.mkdtemp(prefix="phreg_matrix_"))
    try:
        rows = measure(args, work)
    finally:  # random-weight checkpoints and runs: gigabytes for the large families
        shutil.rmtree(work, ignore_errors=True)
    print("\n| model | timm class | prefix tokens before | after | unlocked parameters | s/step "
          "| distill wall s | notes |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def measure(args, work: Path) -> list[tuple]:
    """Distill each model for two steps on random weights; one row per model (its files deleted once measured)."""
    rows = []
    if args.recipes:
        from phreg.config.recipe import load_recipe

        runs = [(r, load_recipe(r).model.name) for r in args.recipes.split(",")]
    else:
        runs = [(args.recipe, name) for name in args.models.split(",")]
    for recipe, name in runs:
        torch.manual_seed(0)
        base = timm.create_model(name, pretrained=False).eval()
        weights = work / f"{name}.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
        run = work / name
        overrides = [f"model.name={name}", f"model.checkpoint={weights}", "train.max_steps=2", "train.log_every=1",
                     f"output_dir={run}", *args.overrides]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "phreg", "distill", recipe, *overrides],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
        wall = time.perf_counter() - t0
        if proc.returncode:
            error = (proc.stderr.strip().splitlines() or ["?"])[-1]
            rows.append((f"{name} ({Path(recipe).stem})", type(base).__name__, base.num_prefix_tokens, "FAILED", "-",
                         "-", f"{wall:.0f}", error))
            continue
        unlocked = re.search(r"total unlocked\s+([\d,]+) of ([\d,]+)", proc.stdout + proc.stderr)
        notes = "; ".join(re.findall(r"note: (\w+): skipped", proc.stdout + proc.stderr))
        student = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
        ok = type(student) is type(base) and student.num_prefix_tokens == base.num_prefix_tokens + 16
        assert ok, f"{name}: export is a {type(student).__name__} with {student.num_prefix_tokens} prefix tokens"
        from phreg.config.recipe import load_recipe

        per_step = step_seconds(run, load_recipe(run / "recipe.yaml").train.batch_size)
        rows.append((f"{name} ({Path(recipe).stem})", type(base).__name__, base.num_prefix_tokens,
                     student.num_prefix_tokens,
                     unlocked.group(1) if unlocked else "?", per_step, f"{wall:.0f}", f"skipped: {notes}" if notes
                     else ""))
        print(*rows[-1], sep=" | ", flush=True)
        shutil.rmtree(run, ignore_errors=True)
        weights.unlink()
    return rows


if __name__ == "__main__":
    main()
