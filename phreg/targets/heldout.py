"""Held-out images: how close a model's patch features are to the teacher's denoised targets.

The number this product is judged by. Targets and the raw teacher's distance are computed once (the raw teacher's
features are view 0 of the same forward); scoring a student afterwards costs one forward per image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import patch_tokens
from ..config.recipe import Recipe
from ..data.images import ImageDataset
from ..models.loading import normalization
from .teacher import DenoisedTeacher
from .views import merge_views


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean 1 - cosine over tokens, per image: (B, L, D) x2 -> (B,)."""
    return 1 - F.cosine_similarity(a.float(), b.float(), dim=-1).mean(-1)


class HeldOut:
    def __init__(self, images: torch.Tensor, targets: torch.Tensor, raw: torch.Tensor, head: str = "final",
                 batch_size: int = 8, sigma: float = 5.0):
        """`head`: how a scored model's patch features are read (the student's head; see `phreg.backbones.heads`)."""
        self.images, self.targets, self.head, self.sigma, self.batch_size = images, targets, head, sigma, batch_size
        self.teacher_distances = cosine_distance(raw, targets)
        self.teacher_distance = self.teacher_distances.mean().item()

    @classmethod
    def from_files(cls, files: list, denoiser: DenoisedTeacher, recipe: Recipe, device, limit: int = 0,
                   batch_size: int = 8) -> "HeldOut":
        files = files[:limit] if limit else files
        mean, std = normalization(denoiser.teacher, recipe.model)
        data = ImageDataset(files, recipe.model.img_size, mean, std, recipe.seed, recipe.data.resize, train=False)
        return cls.from_images(data.images(), denoiser, recipe.seed, device, recipe.model.student_head, batch_size,
                               recipe.model.naclip_sigma)

    @classmethod
    @torch.no_grad()
    def from_images(cls, images: torch.Tensor, denoiser: DenoisedTeacher, seed: int, device, head: str = "final",
                    batch_size: int = 8, sigma: float = 5.0, progress: str | None = None) -> "HeldOut":
        """View plans are drawn per image index from `seed`, as for training crops (epoch 0). `progress`: a label
        for a progress bar (stderr, with ETA), none when None."""
        from tqdm.auto import tqdm

        plan = denoiser.plan_fn()
        plans = torch.stack([plan(rng=np.random.default_rng([seed, 0, i])) for i in range(len(images))])
        targets, raw = [], []
        batches = zip(images.split(batch_size), plans.split(batch_size))
        for x, p in tqdm(batches, total=-(-len(images) // batch_size), desc=progress, disable=progress is None,
                         unit="batch", leave=False):
            x, p = x.to(device), p.to(device)
            with _autocast(device, denoiser.teacher):
                feats = denoiser.views_features(x, p)
            targets.append(merge_views(feats, p, denoiser.grid)[0].cpu())
            raw.append(feats.view(len(x), p.shape[1], *feats.shape[1:])[:, 0].float().cpu())
        held = cls(images, torch.cat(targets), torch.cat(raw), head, batch_size, sigma)
        if head != denoiser.head:  # e.g. NACLIP targets, MaskCLIP student: the baseline is the teacher read as the
            held.teacher_distances = held.distances(denoiser.teacher)  # student is read, where training starts
            held.teacher_distance = held.teacher_distances.mean().item()
        return held

    @torch.no_grad()
    def distances(self, model) -> torch.Tensor:
        """Per-image mean 1 - cosine between `model`'s patch tokens and the denoised targets."""
        device = next(model.parameters()).device
        out = []
        for x, t in zip(self.images.split(self.batch_size), self.targets.split(self.batch_size)):
            with _autocast(device, model):
                out.append(cosine_distance(patch_tokens(model, x.to(device), self.head, self.sigma).float().cpu(), t))
        return torch.cat(out)

    def score(self, model) -> float:
        return self.distances(model).mean().item()

    def result(self, model, step: int) -> dict:
        """The held-out score a run logs at `step`: the raw teacher's distance and `model`'s."""
        return dict(step=step, teacher=self.teacher_distance, student=self.score(model))


def _autocast(device, model):
    """bf16 autocast on a GPU, and wherever the model holds bf16 frozen weights (`speed.frozen_dtype`)."""
    device = torch.device(device)
    bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or bf16)
