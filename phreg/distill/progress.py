"""What a run says while it trains: the step counters a checkpoint keeps, `metrics.jsonl`, the progress bar and the
experiment trackers (`train.trackers`).

Loss and non-finite steps accumulate on the device and are read back - one host sync - only when a line is logged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..config.recipe import Recipe, to_dict
from ..files.atomic import writing


class TrainState:
    """What a checkpoint must remember besides weights and optimizer (the lr schedule is a function of the step)."""

    def __init__(self):
        self.step, self.nonfinite, self.images = 0, 0, 0

    def state_dict(self) -> dict:
        return dict(step=self.step, nonfinite=self.nonfinite, images=self.images)

    def load_state_dict(self, d: dict) -> None:
        self.step, self.nonfinite, self.images = d["step"], d["nonfinite"], d["images"]


class Progress:
    """Loss, non-finite steps and throughput between log lines, written to metrics.jsonl, the bar and the trackers."""

    def __init__(self, acc: Accelerator, path: Path, total: int, initial: int, quiet: bool):
        self.acc, self.start, self.path = acc, time.perf_counter(), path
        self.loss, self.nonfinite = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
        self.micro, self.seen, self.tick = 0, 0, self.start
        with writing("metrics", path):
            self.file = open(path, "a") if acc.is_main_process else None
        self.bar = tqdm(total=total, initial=initial, disable=quiet or not acc.is_local_main_process, desc="distill")

    def add(self, loss: torch.Tensor, images: int, found_inf: torch.Tensor | None) -> None:
        self.loss += loss
        self.micro += 1
        self.seen += images
        if found_inf is not None:
            self.nonfinite += found_inf
            self.bar.update(1)

    def log(self, state: TrainState, epoch: int, lr: float) -> None:
        """One metrics line for the steps since the last one; the images seen and non-finite steps reach `state`."""
        state.nonfinite += int(self.acc.reduce(self.nonfinite, "max").item())
        mean_loss = self.acc.reduce(self.loss, "mean").item() / self.micro
        now = time.perf_counter()
        state.images += self.seen
        self.write(dict(step=state.step, epoch=epoch, loss=round(mean_loss, 6), lr=lr,
                        images_per_s=round(self.seen / (now - self.tick), 3), nonfinite=state.nonfinite,
                        elapsed_s=round(now - self.start, 1)))
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{self.seen / (now - self.tick):.2f}")
        self.loss.zero_()
        self.nonfinite.zero_()
        self.micro, self.seen, self.tick = 0, 0, now

    def log_heldout(self, result: dict, quiet: bool) -> None:
        """A held-out score (`HeldOut.result`): a line above the bar and a metrics row."""
        if not quiet and not self.bar.disable:  # tqdm.write clears the bar, prints the line, redraws the bar below
            self.bar.write(f"step {result['step']}: held-out mean 1-cos to denoised targets: teacher "
                           f"{result['teacher']:.4f}  student {result['student']:.4f}")
        self.write(dict(heldout=result))

    def write(self, row: dict) -> None:
        """One line of metrics.jsonl; the same numbers go to the experiment trackers (`train.trackers`)."""
        if self.file:
            with writing("metrics", self.path):
                self.file.write(json.dumps(row) + "\n")
                self.file.flush()
        if self.acc.trackers:
            flat = {f"heldout/{k}": v for k, v in row["heldout"].items() if k != "step"} if "heldout" in row else row
            self.acc.log({k: v for k, v in flat.items() if k != "step"},
                         step=row["heldout"]["step"] if "heldout" in row else row["step"])

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()


def flat(d: dict, prefix: str = "") -> dict:
    """A nested dict as dotted keys: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def tracker_config(recipe: Recipe) -> dict:
    """The recipe as flat scalars (TensorBoard's hparams take no lists or None)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flat(to_dict(recipe)).items()}
