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

from ..data import load_rgb
from .inputs import mask_files, read_mask, split_indices  # noqa: F401  (split_indices: imported from here too)


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
def confusion(probe, feats: torch.Tensor, masks: list[torch.Tensor], num_classes: int,
              ignore_index: int | None) -> torch.Tensor:
    """(K, K) counts [true, predicted] over all labelled pixels, logits upsampled to each mask's size."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for f, m in zip(feats, masks):
        pred = F.interpolate(probe(f[None]), size=m.shape, mode="bilinear", align_corners=False)[0].argmax(0)
        keep = m != ignore_index if ignore_index is not None else torch.ones_like(m, dtype=torch.bool)
        cm += torch.bincount(m[keep] * num_classes + pred[keep], minlength=num_classes ** 2).view(num_classes, -1)
    return cm


def scores(cm: torch.Tensor) -> dict:
    """mIoU over classes present in the ground truth or predictions, pixel accuracy, per-class IoU."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    present = union > 0
    return dict(miou=iou[present].mean().item(), pixel_accuracy=(tp.sum() / cm.sum().clamp(min=1)).item(),
                per_class_iou=[None if torch.isnan(v) else round(v.item(), 4) for v in iou])
