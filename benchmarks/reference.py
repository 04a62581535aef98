"""A reference-style distillation step, for comparison only (not part of phreg).

It follows the structure of the PH-Reg authors' training code: views are built image by image (their data loader),
all B x V views go through the teacher in one forward with *eager* attention (softmax(QK^T)V written out) and float32
weights, features are put back with boolean masks / nonzero() index assignment, NaN checks run on the teacher
features, the student features and the loss, the optimizer is plain AdamW, and the loss is read with .item() every
step (on the `meta` device, which holds no values, these read-backs are skipped: benchmarks/gpu_suite.py's dry run
runs this step there). No compilation. The loader's work (views, index maps) happens where the images are, then moves
to the models' device, as in the authors' loop, so the step runs on any device. Given the same images and view plans
it computes the same targets as phreg (the benchmark checks this before timing anything).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from meta_device import readable


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
        """One view, built where the image is (the authors build them in their data loader, on the CPU)."""
        p, (_, h, w), dev = self.patch, image.shape, image.device
        out = torch.roll(image, shifts=(dy * p, dx * p), dims=(1, 2))
        rows, cols = torch.arange(h, device=dev) - dy * p, torch.arange(w, device=dev) - dx * p
        inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        out = torch.where(inside, out, self.fill.to(dev).view(-1, 1, 1))
        return out.flip(-1) if flip else out

    def source_index(self, dy: int, dx: int, flip: int) -> torch.Tensor:
        """(2, gh, gw): for each view cell, the original cell it shows, or -1 (the authors' `shifted_idxs`)."""
        gh, gw = self.grid
        rows, cols = torch.meshgrid(torch.arange(gh) - dy, torch.arange(gw) - dx, indexing="ij")
        idx = torch.stack([rows, cols])
        idx[:, (rows < 0) | (rows >= gh) | (cols < 0) | (cols >= gw)] = -1
        return idx.flip(-1) if flip else idx

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor, plans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loader's work (views and index maps, image by image, where the images are), moved to the teacher's
        device as the authors' loop moves its batch, and the teacher's patch features of all B x V views in one
        forward: (B*V, gh, gw, D) features and (B*V, 2, gh, gw) source indices, both on the teacher's device."""
        b, v, (gh, gw) = len(images), plans.shape[1], self.grid
        device = next(self.teacher.parameters()).device
        rows = plans.tolist()
        views = torch.stack([self.view(images[i], *rows[i][k]) for i in range(b) for k in range(v)]).to(device)
        index = torch.stack([self.source_index(*rows[i][k]) for i in range(b) for k in range(v)]).to(device)
        feats = self.teacher.forward_features(views)[:, self.teacher.num_prefix_tokens:].reshape(b * v, gh, gw, -1)
        return feats, index

    @torch.no_grad()
    def targets(self, images: torch.Tensor, plans: torch.Tensor) -> torch.Tensor:
        b, v, (gh, gw) = len(images), plans.shape[1], self.grid
        feats, index = self.teacher_features(images, plans)
        maps, counts = torch.zeros_like(feats), torch.zeros(b * v, gh, gw, device=feats.device)
        n, h, w = (index >= 0).all(1).nonzero(as_tuple=True)
        maps[n, index[n, 0, h, w], index[n, 1, h, w]] = feats[n, h, w]
        counts[n, index[n, 0, h, w], index[n, 1, h, w]] = 1
        maps = maps.view(b, v, gh, gw, -1).sum(1) / counts.view(b, v, gh, gw).sum(1).unsqueeze(-1)
        if readable(maps) and (torch.isnan(maps).any() or torch.isinf(maps).any()):
            raise FloatingPointError("teacher features")
        return maps.flatten(1, 2)

    def step(self, images: torch.Tensor, plans: torch.Tensor) -> float:
        """One training step on a loader batch (images and plans where the loader made them, e.g. the CPU)."""
        target = self.targets(images, plans)
        pred = self.student.forward_features(images.to(target.device))[:, self.student.num_prefix_tokens:]
        if readable(pred) and (torch.isnan(pred).any() or torch.isinf(pred).any()):
            raise FloatingPointError("student features")
        loss = (1 - F.cosine_similarity(pred, target, dim=-1).mean()) + self.cfg.mse_weight * F.mse_loss(pred, target)
        if readable(loss) and torch.isnan(loss).any():
            raise FloatingPointError("loss")
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or float("inf"))
        self.optimizer.step()
        return loss.item() if readable(loss) else float("nan")
