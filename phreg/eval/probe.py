"""Dense linear probe: a 1x1 linear head on frozen patch features, scored by mIoU at the masks' own resolution.

Protocol (the same for teacher and student): the whole image is resized to the model's square input; features are
standardized with the train split's statistics; the head trains full-batch (AdamW, fixed steps, zero init: fully
deterministic) on labels at 4x the feature grid; at test time its logits are upsampled bilinearly to each mask's
full size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..backbones import backbone, patch_tokens
from ..data.images import load_rgb
from .inputs import mask_files, read_mask, split_indices  # noqa: F401  (split_indices: imported from here too)
from .segmentation import confusion, scores


def load_masks(files: list[Path], masks_dir: str | Path, num_classes: int, ignore_index: int | None) -> list[torch.Tensor]:
    """One single-channel integer mask per image, same stem, same size; anything else is an error."""
    return [torch.from_numpy(read_mask(m, f, num_classes, ignore_index)) for m, f in zip(mask_files(files, masks_dir), files)]


def squashed_images(files: list[Path], size: int, mean, std) -> torch.Tensor:
    """Whole images resized to size x size (no crop: every labelled pixel is evaluated)."""
    m, s = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    out = [(np.asarray(load_rgb(f).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255 - m) / s
           for f in files]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def fit_probe(feats: torch.Tensor, masks: list[torch.Tensor], num_classes: int, ignore_index: int | None,
              steps: int = 300, lr: float = 0.05, upsample: int = 4, progress: str | None = None) -> torch.nn.Module:
    """feats (N, D, gh, gw) -> a standardize + 1x1 conv head trained with cross-entropy. `progress`: label of a
    progress bar (stderr, with ETA), none when None."""
    from tqdm.auto import tqdm

    n, d, gh, gw = feats.shape
    mean, std = feats.mean((0, 2, 3), keepdim=True), feats.std((0, 2, 3), keepdim=True).clamp(min=1e-6)
    head = torch.nn.Conv2d(d, num_classes, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    size = (gh * upsample, gw * upsample)
    labels = torch.stack([F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0].long() for m in masks])
    ignore = -100 if ignore_index is None else ignore_index
    x = (feats - mean) / std
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in tqdm(range(steps), desc=progress, disable=progress is None, unit="step", leave=False):
        logits = F.interpolate(head(x), size=size, mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels, ignore_index=ignore)
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe = torch.nn.Sequential(_Standardize(mean, std), head)
    return probe.eval().requires_grad_(False)


class _Standardize(torch.nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x):
        return (x - self.mean) / self.std


@torch.no_grad()
def probe_confusion(probe, feats: torch.Tensor, masks: list[torch.Tensor], num_classes: int,
                    ignore_index: int | None) -> torch.Tensor:
    """(K, K) counts [true, predicted] of the probe over all labelled pixels, logits upsampled to each mask's size."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for f, m in zip(feats, masks):
        pred = F.interpolate(probe(f[None]), size=m.shape, mode="bilinear", align_corners=False)[0].argmax(0)
        cm += confusion(pred, m, num_classes, ignore_index)
    return cm


@torch.no_grad()
def evaluate_probe(teacher, student, files: list[Path], masks_dir, num_classes: int, ignore_index: int | None,
                   train: list[int], val: list[int], device) -> dict:
    """Teacher and student (`phreg.models.Loaded`), each probed on its own frozen patch features: a head fitted on
    the `train` images, scored on the `val` ones."""
    masks = load_masks(files, masks_dir, num_classes, ignore_index)
    out = dict(train_images=len(train), val_images=len(val), num_classes=num_classes, ignore_index=ignore_index)
    for role, loaded in (("teacher", teacher), ("student", student)):
        x = squashed_images(files, loaded.img_size, loaded.mean, loaded.std)
        grid = backbone(loaded.model).grid
        feats = torch.cat([patch_tokens(loaded.model, b.to(device)).float().cpu() for b in x.split(8)])
        feats = feats.transpose(1, 2).reshape(len(files), -1, *grid)
        with torch.enable_grad():
            head = fit_probe(feats[train], [masks[i] for i in train], num_classes, ignore_index,
                             progress=f"{role}: linear probe")
        out[role] = scores(probe_confusion(head, feats[val], [masks[i] for i in val], num_classes, ignore_index))
    return out
