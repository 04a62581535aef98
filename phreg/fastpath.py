"""The switches that make a step fast, in one place. Each is a recipe key under `speed:` (and `views.chunk`), and
each is measured by benchmarks/bench_distill.py against a reference-style step.

Measured (benchmarks/RESULTS.md): fused SDPA attention is up to 1.9x faster than eager at 518 px on 2 CPU cores;
bf16 autocast is *slower* than fp32 on a CPU without AMX, so the teacher stays fp32 there; torch.compile pays on a
GPU (1.24x end to end on an H200) and gains nothing on a CPU, so `auto` compiles on a GPU only.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .backbones import backbone
from .recipe import SpeedCfg


def set_fused_attention(model: torch.nn.Module, fused: bool) -> None:
    """timm's Attention modules choose SDPA (fused) or the explicit softmax(QK^T)V (eager) by this flag."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


@contextlib.contextmanager
def eager_attention(module: torch.nn.Module):
    """timm's explicit softmax(QK^T)V path inside `module` for a while (FLOP counting, reading attention weights),
    then each attention module's own setting again."""
    saved = [(m, m.fused_attn) for m in module.modules() if hasattr(m, "fused_attn")]
    for m, _ in saved:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, flag in saved:
            m.fused_attn = flag


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


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


CPU_TOKENS_PER_FORWARD = 2048


def teacher_view_bytes(model: torch.nn.Module, bf16: bool) -> int:
    """The no-grad working set of one view in a teacher forward, the one formula every estimate uses (views per
    forward here, the run's memory estimate in `phreg.distill.memory`): the activations of one block (residual
    stream, qkv, attention output, MLP hidden layer; SwiGLU / GLU: both branches), twice (a block's input and output
    live at once)."""
    family = backbone(model)
    gh, gw = family.grid
    tokens, dim = gh * gw + family.num_prefix, model.embed_dim
    return tokens * (4 * dim + 3 * dim + family.mlp_width) * (2 if bf16 else 4) * 2


def auto_chunk(model: torch.nn.Module, device: torch.device, bf16: bool, share: float = 0.4) -> int:
    """Views per teacher forward: as many as fit in `share` of the free memory (`teacher_view_bytes` each, plus its
    float32 input image); on a CPU also at most ~2K tokens, which keeps the working set in cache (2 cores, DINOv2-S:
    15.0 vs 11.8 views/s at 224 px for 8 vs 80 views per forward, 2.17 vs 1.77 at 518 px for 1 vs 16)."""
    family = backbone(model)
    tokens = family.grid[0] * family.grid[1] + family.num_prefix
    h, w = model.patch_embed.img_size
    per_view = teacher_view_bytes(model, bf16) + 3 * h * w * 4
    fits = max(1, int(share * _available_bytes(device) // per_view))
    return fits if device.type == "cuda" else min(fits, max(1, CPU_TOKENS_PER_FORWARD // tokens))
