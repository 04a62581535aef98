"""Teacher targets: the frozen teacher's patch features, denoised by averaging its augmented views, and how many
views fit in one of its forwards."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..backbones import PatchTokens, backbone
from ..config.recipe import ViewsCfg
from ..data.images import Normalize
from .views import make_views, merge_views, plan_sampler


def fill_value(fill, mean, std) -> torch.Tensor:
    """The pixel written outside the frame, in the model's normalization. `fill` is a name or [r, g, b] in [0, 1]."""
    mean, std = torch.tensor(mean), torch.tensor(std)
    rgb = {"white": torch.ones(3), "black": torch.zeros(3), "mean": mean}.get(fill) if isinstance(fill, str) \
        else torch.tensor(fill, dtype=torch.float32)
    return (rgb - mean) / std


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


def teacher_forward(tokens: PatchTokens, views: torch.Tensor) -> torch.Tensor:
    """The teacher's patch tokens of a stack of views. Compiled on its own (`DenoisedTeacher(compile={...})`), so that
    torch.compile keeps the teacher's graphs apart from the student's: a compiled frame's cache belongs to its code
    object, and a forward shared with the student would recompile on every switch of grad mode and autocast."""
    return tokens(views)


class DenoisedTeacher(torch.nn.Module):
    """All views of a batch in one forward (split into chunks only to fit memory), then merged.

    `autocast` is the teacher's own precision context (it may differ from the student's); `head` is how the
    teacher's patch features are read (`phreg.backbones.heads`: final, last_block, naclip with neighbourhood width
    `sigma`, maskclip). `compile` (torch.compile's arguments, `phreg.distill.speed.compile_options`; None = eager) compiles
    `teacher_forward` for one static input shape: min(chunk, batch x views)
    views, the views of one training batch (`batch`); a smaller piece (an epoch's or the cache build's last batch, a
    held-out batch) is padded with copies of its last view, whose features are dropped. Views are independent samples,
    so padding changes no result, and the compiled teacher never recompiles for a size change.
    """

    def __init__(self, teacher: torch.nn.Module, views: ViewsCfg, mean, std,
                 autocast=contextlib.nullcontext, compile: dict | None = None, head: str = "final", sigma: float = 5.0,
                 batch: int = 8):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.cfg, self.autocast, self.head = views, autocast, head
        family = backbone(teacher)
        self.patch, self.grid = family.patch_size, family.grid
        self.num_patches, self.dim = self.grid[0] * self.grid[1], family.head_dim(head)
        self.tokens = PatchTokens(teacher, head, sigma)
        self.compiled = compile is not None
        self._forward = torch.compile(teacher_forward, **compile) if self.compiled else teacher_forward
        self.register_buffer("fill", fill_value(views.fill, mean, std), persistent=False)
        self.normalize = Normalize(mean, std)  # uint8 pixels -> the model's input (teacher and student alike)
        self._chunk, self.batch = views.chunk, batch

    def plan_fn(self):
        """A picklable `plan(rng=...)` for the data workers."""
        return plan_sampler(self.grid, self.cfg)

    def chunk(self, device: torch.device) -> int:
        if not self._chunk:
            bf16 = self.autocast is not contextlib.nullcontext or (  # autocast is asked only where it exists
                torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type))
            self._chunk = auto_chunk(self.teacher, device, bf16)
        return self._chunk

    @torch.no_grad()
    def views_features(self, images: torch.Tensor, plans: torch.Tensor) -> torch.Tensor:
        views = make_views(images, plans, self.patch, self.fill)
        chunk = self.chunk(views.device)
        if self.compiled:
            chunk = min(chunk, self.batch * self.cfg.num)
        with self.autocast():
            return torch.cat([self._features(v, chunk) for v in views.split(chunk)])

    def _features(self, views: torch.Tensor, size: int) -> torch.Tensor:
        n = len(views)
        if self.compiled and n < size:  # one static shape for the compiled teacher
            views = torch.cat([views, views[-1:].expand(size - n, *views.shape[1:])])
        return self._forward(self.tokens, views)[:n]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, plans: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B, V, 3) -> denoised patch features (B, L, D), float32."""
        return merge_views(self.views_features(images, plans), plans, self.grid)[0]
