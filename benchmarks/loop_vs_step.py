"""`phreg distill` end to end against its own `train_step` alone, same recipe, same process: where the loop loses.

    python benchmarks/loop_vs_step.py RECIPE [key=value ...] [--cpu] [--profile]

Times `train_step` alone on pre-collated batches already on the device (median of 12 after 2 warm-up steps), then runs
`phreg distill` with the same recipe (its data loader, collate, host-to-device copies, logging and checkpoints
included) and reads its steady-state images/s from metrics.jsonl (the first logged interval left out). Prints one
JSON line: step_alone_images_per_s, loop_images_per_s, loop_over_step. --profile also prints the PyTorch profiler's
table of the loop's busiest operations (self CPU time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from accelerate.state import AcceleratorState, GradientState

from phreg.config.recipe import load_recipe
from phreg.data.images import ImageDataset, collate
from phreg.data.scan import scan_images
from phreg.distill.loop import distill
from phreg.distill.step import build_parts, make_accelerator, train_step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(args.recipe, [*args.overrides, f"output_dir={tmp}/run", "train.save_every=0"])
        b = recipe.train.batch_size
        acc = make_accelerator(recipe, args.cpu)
        parts = build_parts(recipe, acc.device, "bf16" if acc.mixed_precision == "bf16" else "fp32")
        files, _ = scan_images(recipe.data.root)
        data = ImageDataset(files, recipe.model.img_size, parts.mean, parts.std, recipe.seed, train=True,
                            make_plan=parts.targets.plan_fn())
        batches = [collate([data[(0, (b * k + i) % len(data))] for i in range(b)]) for k in range(4)]
        batches = [{k: v.to(acc.device) if hasattr(v, "to") else v for k, v in x.items()} for x in batches]
        model, optimizer = acc.prepare(parts.student_tokens, parts.optimizer)
        step = lambda x: train_step(acc, model, parts.targets, optimizer, parts.params, x, recipe.train)  # noqa: E731
        for x in batches[:2]:
            step(x)
        times = []
        for k in range(12):
            t0 = time.perf_counter()
            step(batches[k % 4])
            if acc.device.type == "cuda":
                import torch

                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step_ips = b / statistics.median(times)
        del model, optimizer, parts
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                distill(recipe, cpu=args.cpu, quiet=True)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        else:
            distill(recipe, cpu=args.cpu, quiet=True)
        rows = [r for r in map(json.loads, (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]
        if len(rows) < 2:
            sys.exit("loop_vs_step: give train.max_steps at least 2 x train.log_every")
        loop_ips = (rows[-1]["step"] - rows[0]["step"]) * b / (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"])
    out = dict(step_alone_images_per_s=round(step_ips, 3), loop_images_per_s=round(loop_ips, 3),
               loop_over_step=round(loop_ips / step_ips, 3))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
