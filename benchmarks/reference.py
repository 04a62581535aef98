"""A reference-style distillation step, for comparison only (not part of phreg).

It follows the structure of the PH-Reg authors' training code: views are built image by image (their data loader),
all B x V views go through the teacher in one forward with *eager* attention (softmax(QK^T)V written out) and float32
weights, features are put back with boolean masks / nonzero() index assignment, NaN checks run on the teacher
features, the student features and the loss, the optimizer is plain AdamW, and the loss is read with .item() every
step. No compilation. Given the same images and view plans it computes the same targets as phreg (the benchmark
checks this before timing anything).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


class ReferenceStep:
    def __init__(self, teacher, student, param_names: list[str], fill: torch.Tensor, cfg):
        self.teacher = copy.deepcopy(teacher).eval().float()
        self.student = copy.deepcopy(student).float()
        for model in (self.teacher, self.student):
            for m in model.modules():
                if hasattr(m, "fused_attn"):
                    m.fused_attn = False
        named = dict(self.student.named_parameters())
        self.student.requires_grad_(False)
        params = [named[n].requires_grad_(True) for n in param_names]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.params, self.fill, self.cfg = params, fill, cfg
        self.patch = teacher.patch_embed.patch_size[0]
        self.grid = tuple(teacher.patch_embed.grid_size)

    def view(self, image: torch.Tensor, dy: int, dx: int, flip: int) -> torch.Tensor:
        p, (_, h, w) = self.patch, image.shape
        out = torch.roll(image, shifts=(dy * p, dx * p), dims=(1, 2))
        rows, cols = torch.arange(h) - dy * p, torch.arange(w) - dx * p
        inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        out = torch.where(inside, out, self.fill.view(-1, 1, 1))
        return out.flip(-1) if flip else out

    def source_index(self, dy: int, dx: int, flip: int) -> torch.Tensor:
        """(2, gh, gw): for each view cell, the original cell it shows, or -1 (the authors' `shifted_idxs`)."""
        gh, gw = self.grid
        rows, cols = torch.meshgrid(torch.arange(gh) - dy, torch.arange(gw) - dx, indexing="ij")
        idx = torch.stack([rows, cols])
        idx[:, (rows < 0) | (rows >= gh) | (cols < 0) | (cols >= gw)] = -1
        return idx.flip(-1) if flip else idx

    @torch.no_grad()
    def targets(self, images: torch.Tensor, plans: torch.Tensor) -> torch.Tensor:
        b, v, (gh, gw) = len(images), plans.shape[1], self.grid
        views = torch.stack([self.view(images[i], *plans[i, k].tolist()) for i in range(b) for k in range(v)])
        index = torch.stack([self.source_index(*plans[i, k].tolist()) for i in range(b) for k in range(v)])
        feats = self.teacher.forward_features(views)[:, self.teacher.num_prefix_tokens:].reshape(b * v, gh, gw, -1)
        maps, counts = torch.zeros_like(feats), torch.zeros(b * v, gh, gw)
        n, h, w = (index >= 0).all(1).nonzero(as_tuple=True)
        maps[n, index[n, 0, h, w], index[n, 1, h, w]] = feats[n, h, w]
        counts[n, index[n, 0, h, w], index[n, 1, h, w]] = 1
        maps = maps.view(b, v, gh, gw, -1).sum(1) / counts.view(b, v, gh, gw).sum(1).unsqueeze(-1)
        if torch.isnan(maps).any() or torch.isinf(maps).any():
            raise FloatingPointError("teacher features")
        return maps.flatten(1, 2)

    def step(self, images: torch.Tensor, plans: torch.Tensor) -> float:
        target = self.targets(images, plans)
        pred = self.student.forward_features(images)[:, self.student.num_prefix_tokens:]
        if torch.isnan(pred).any() or torch.isinf(pred).any():
            raise FloatingPointError("student features")
        loss = (1 - F.cosine_similarity(pred, target, dim=-1).mean()) + self.cfg.mse_weight * F.mse_loss(pred, target)
        if torch.isnan(loss).any():
            raise FloatingPointError("loss")
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or float("inf"))
        self.optimizer.step()
        return loss.item()
