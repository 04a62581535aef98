"""The run-level speed switches, each a recipe key under `speed:`: torch.compile, and the precision the frozen teacher
runs in. `benchmarks/bench_distill.py` and `benchmarks/gpu_suite.py` measure each against the alternative.

Measured (benchmarks/RESULTS.md): bf16 autocast is *slower* than fp32 on a CPU without AMX, so the teacher stays fp32
there; torch.compile pays on a GPU (1.24x end to end on an H200) and gains nothing on a CPU, so `auto` compiles on a
GPU only.
"""

from __future__ import annotations

import contextlib

import torch

from ..config.recipe import SpeedCfg


def use_compile(cfg: SpeedCfg, device: torch.device) -> bool:
    """`speed.compile: auto` compiles on a GPU, where the compiled run is faster (H200, DINOv2-B at the paper's
    setting: 94.1 vs 76.2 images/s end to end, see benchmarks/RESULTS.md), and not on a CPU, where it gains nothing
    per step and costs ~40 s per model to compile."""
    return device.type == "cuda" if cfg.compile == "auto" else bool(cfg.compile)


def compile_options(cfg: SpeedCfg) -> dict:
    """torch.compile arguments for teacher and student: one static shape each (`dynamic=False`: every training step has
    the same shape, see `phreg.distill.session.drop_partial_batch`) and `speed.compile_mode`."""
    return dict(dynamic=False, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)


def teacher_precision(cfg: SpeedCfg, device: torch.device, train_precision: str) -> str:
    """"bf16" or "fp32": what `speed.teacher_precision` resolves to here (auto: bf16 on a GPU unless training fp32)."""
    want = cfg.teacher_precision
    if cfg.frozen_dtype == "bf16":  # bf16 weights: the teacher's matmuls are bf16 whatever the input
        return "bf16"
    if want == "auto":
        want = "bf16" if device.type == "cuda" and train_precision != "fp32" else "fp32"
    return want


def teacher_autocast(cfg: SpeedCfg, device: torch.device, train_precision: str):
    """The frozen teacher may run in bf16 even when the student trains in fp32 (and vice versa)."""
    if teacher_precision(cfg, device, train_precision) == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
