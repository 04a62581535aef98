"""Fused (SDPA) or eager attention, on any family: timm's attention modules choose by a flag. Fused is the fast path
(up to 1.9x eager at 518 px on 2 CPU cores, benchmarks/RESULTS.md); the eager path is what FLOP counting and reading
attention weights need."""

from __future__ import annotations

import contextlib

import torch



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
