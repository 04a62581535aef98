"""Dense linear probes on frozen features, as the PH-Reg paper's evaluation configures them (DINOv2's heads): a
BatchNorm and a 1x1 linear layer on the last block's normalized patch tokens, trained on the train split's images and
scored on its val images. This module holds what the segmentation and depth probes share (windows, features, the
head, its training loop) and the segmentation probe; `depth.py` the depth probe.

Protocol (the same for every model compared): each image is resized so its short side is the model's input size
(aspect kept) and read in square windows of that size every 341/518 of it (the paper's 518-px slide window, stride
341). The head trains on every window of the train images (features computed once per model, kept in float16), with
AdamW in minibatches of 8, for `steps` iterations; at test time the windows' logits are averaged where they overlap and
upsampled bilinearly to each mask's own size. Where this differs from the paper (no random scale, crop, flip or colour
jitter in training; a short default schedule) is in docs/evaluation.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..backbones import backbone
from ..data.images import load_rgb
from .datasets import PROBE_STEPS
from .inputs import mask_files, read_mask
from .segmentation import confusion, scores

STRIDE = 341 / 518  # the paper's slide window: 518-px crops every 341 px
BATCH = 8  # windows per training step
SEG = dict(lr=1e-3, weight_decay=1e-4)  # AdamW, poly decay (0.9); the paper: 40k iterations (ADE20K), 20k (VOC)
STEPS = PROBE_STEPS


def load_masks(files: list[Path], masks, num_classes: int, ignore_index: int | None,
               label_map: tuple[int, ...] | None = None) -> list[torch.Tensor]:
    """One mask per image (`masks`: a folder, matched by file stem, or a list of files), checked and mapped."""
    paths = mask_files(files, masks) if isinstance(masks, (str, Path)) else masks
    return [torch.from_numpy(read_mask(m, f, num_classes, ignore_index, label_map)) for m, f in zip(paths, files)]


# --------------------------------------------------------------------------------------------- windows, features

@dataclass(frozen=True)
class Plan:
    """How one image is read: resized to (h, w) (short side = the model's input size), windows at `corners`."""
    h: int
    w: int
    corners: list[tuple[int, int]]


def plan(width: int, height: int, size: int) -> Plan:
    from ..clip.segmenter import resized_size, windows

    h, w = resized_size(height, width, size)
    return Plan(h, w, windows(h, w, size, max(1, round(size * STRIDE))))


def resized(image: Image.Image, p: Plan, resample=Image.BILINEAR) -> Image.Image:
    return image.resize((p.w, p.h), resample)


def crops(array: np.ndarray, p: Plan, size: int) -> np.ndarray:
    """(h, w, ...) at the plan's size -> (n, size, size, ...) windows."""
    return np.stack([array[y:y + size, x:x + size] for y, x in p.corners])


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) as `load_rgb` gives the image (EXIF rotation applied), from the header alone."""
    with Image.open(path) as img:
        w, h = img.size
        return (h, w) if img.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)


def image_windows(path: Path, size: int, mean, std) -> tuple[torch.Tensor, Plan]:
    """One image's windows, normalized: (n, 3, size, size)."""
    img = load_rgb(path)
    p = plan(*img.size, size)
    rgb = np.asarray(resized(img, p), dtype=np.float32) / 255
    x = (crops(rgb, p, size) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), p


@torch.no_grad()
def features(model, x: torch.Tensor, with_cls: bool = False) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C, gh, gw): the last block's patch tokens after the final norm; with `with_cls`, the class
    token concatenated to every patch (C = 2D; models without a class token: the patch tokens alone)."""
    bb = backbone(model)
    device = next(model.parameters()).device
    tokens = model.forward_features(x.to(device)).float()
    gh, gw = x.shape[-2] // bb.patch_size, x.shape[-1] // bb.patch_size
    patches = tokens[:, bb.num_prefix:].transpose(1, 2).reshape(len(x), -1, gh, gw)
    if with_cls and bb.has_class_token:
        patches = torch.cat([patches, tokens[:, 0, :, None, None].expand(-1, -1, gh, gw)], 1)
    return patches


def feature_width(model, with_cls: bool) -> int:
    bb = backbone(model)
    return model.embed_dim * (2 if with_cls and bb.has_class_token else 1)


def train_windows(loaded, files: list[Path], targets, with_cls: bool, device, progress: str | None = None):
    """Features (N, C, gh, gw) float16 and targets (N, size, size) of every window of `files`; `targets(i, plan)`
    gives image i's target at the plan's size (h, w). Memory is allocated once, from the images' headers."""
    from tqdm.auto import tqdm

    size, model = loaded.img_size, loaded.model.to(device).eval()
    n, grid = sum(len(plan(*upright_size(f), size).corners) for f in files), backbone(model).grid
    feats = torch.empty(n, feature_width(model, with_cls), *grid, dtype=torch.float16)
    labels = None
    at = 0
    for i, f in enumerate(tqdm(files, desc=progress, disable=progress is None, unit="image", leave=False)):
        x, p = image_windows(f, size, loaded.mean, loaded.std)
        k = len(x)
        feats[at:at + k] = torch.cat([features(model, b, with_cls).half().cpu() for b in x.split(BATCH)])
        t = torch.from_numpy(crops(targets(i, p), p, size))
        labels = torch.empty(n, *t.shape[1:], dtype=t.dtype) if labels is None else labels
        labels[at:at + k] = t
        at += k
    return feats, labels


# -------------------------------------------------------------------------------------------------------- head

class LinearHead(torch.nn.Module):
    """The paper's head: BatchNorm over the feature channels, then a 1x1 linear layer."""

    def __init__(self, channels: int, outputs: int, generator: torch.Generator | None = None):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(channels)
        self.conv = torch.nn.Conv2d(channels, outputs, 1)
        torch.nn.init.normal_(self.conv.weight, 0, 0.01, generator=generator)  # mmseg's init of the classifier
        torch.nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


def poly(step: int, steps: int) -> float:
    """mmseg's PolyLR (power 0.9, down to 0): the segmentation probe's schedule."""
    return (1 - step / steps) ** 0.9


def cosine_warmup(step: int, steps: int, warmup: float = 12800 / 30000, ratio: float = 1e-3,
                  floor: float = 1e-8) -> float:
    """mmcv's CosineAnnealing with linear warmup as the depth config sets it (12,800 of 30,000 iterations warm up
    from 0.001x; the cosine ends at 1e-8x): the depth probe's schedule, at any length."""
    cos = floor + (1 - floor) * (1 + math.cos(math.pi * step / steps)) / 2
    w = round(warmup * steps)
    return cos * (1 - (1 - step / w) * (1 - ratio)) if step < w else cos


def train_head(head: torch.nn.Module, feats: torch.Tensor, targets: torch.Tensor, loss_fn, steps: int, lr: float,
               weight_decay: float, schedule, batch: int = BATCH, clip: float | None = None, seed: int = 0,
               progress: str | None = None, decay_norm: bool = True, device="cpu") -> torch.nn.Module:
    """AdamW on minibatches of windows drawn without replacement (a fresh order each pass, from `seed`): `loss_fn(out,
    targets, step)`; `schedule(step, steps)` scales the learning rate. The windows stay where they are (the CPU), each
    minibatch goes to `device`. Returns the head in eval mode, frozen, on `device`."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    head = head.to(device)
    norm = [p for n, p in head.named_parameters() if n.startswith("bn.")]
    rest = [p for n, p in head.named_parameters() if not n.startswith("bn.")]
    opt = torch.optim.AdamW([dict(params=rest), dict(params=norm, weight_decay=weight_decay if decay_norm else 0.0)],
                            lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, steps))
    order, at, b = torch.randperm(len(feats), generator=g), 0, min(batch, len(feats))
    head.train()
    for step in tqdm(range(steps), desc=progress, disable=progress is None, unit="step", leave=False):
        if at + b > len(order):
            order, at = torch.randperm(len(feats), generator=g), 0
        idx = order[at:at + b]
        at += b
        loss = loss_fn(head(feats[idx].to(device).float()), targets[idx].to(device), step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(head.parameters(), clip)
        opt.step()
        sched.step()
    return head.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------- segmentation

def fit_probe(feats: torch.Tensor, masks: list[torch.Tensor] | torch.Tensor, num_classes: int,
              ignore_index: int | None, steps: int = STEPS, lr: float = SEG["lr"], progress: str | None = None,
              seed: int = 0, device="cpu") -> torch.nn.Module:
    """feats (N, D, gh, gw) -> the paper's segmentation head (BatchNorm + 1x1 linear) trained with cross-entropy on
    logits upsampled bilinearly to the masks' size (all masks one size), AdamW with poly decay."""
    labels = masks if isinstance(masks, torch.Tensor) else torch.stack(list(masks))
    ignore = -100 if ignore_index is None else ignore_index

    def loss(logits, target, step):
        up = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(up, target.long(), ignore_index=ignore)
    head = LinearHead(feats.shape[1], num_classes, torch.Generator().manual_seed(seed))
    return train_head(head, feats, labels, loss, steps, lr, SEG["weight_decay"], poly, seed=seed, progress=progress,
                      device=device)


@torch.no_grad()
def probe_confusion(probe, feats: torch.Tensor, masks: list[torch.Tensor], num_classes: int,
                    ignore_index: int | None) -> torch.Tensor:
    """(K, K) counts [true, predicted] of the probe over all labelled pixels, logits upsampled to each mask's size."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    device = next(probe.parameters(), torch.empty(0)).device
    for f, m in zip(feats, masks):
        logits = probe(f[None].float().to(device)).cpu()
        pred = F.interpolate(logits, size=m.shape, mode="bilinear", align_corners=False)[0].argmax(0)
        cm += confusion(pred, m, num_classes, ignore_index)
    return cm


@torch.no_grad()
def window_outputs(head, loaded, path: Path, device, with_cls: bool = False, flip: bool = False,
                   out=None) -> tuple[torch.Tensor, Plan]:
    """One image through the model and a head (`out` maps the head's output, e.g. bins -> depth): each window's
    output upsampled bilinearly to the window, averaged where windows overlap: (C, h, w) at the plan's size. With
    `flip`, the mirrored windows too, mirrored back and averaged (test-time flip)."""
    size, model = loaded.img_size, loaded.model
    x, p = image_windows(path, size, loaded.mean, loaded.std)
    out = out or (lambda y: y)
    total = count = None
    corners = iter(p.corners)
    for b in x.split(BATCH):
        got = out(head(features(model, b, with_cls)))
        if flip:
            got = (got + out(head(features(model, b.flip(-1), with_cls))).flip(-1)) / 2
        for g in got.float().cpu():
            if total is None:
                total, count = torch.zeros(len(g), p.h, p.w), torch.zeros(1, p.h, p.w)
            y, x0 = next(corners)
            total[:, y:y + size, x0:x0 + size] += F.interpolate(g[None], size=(size, size), mode="bilinear",
                                                                align_corners=False)[0]
            count[:, y:y + size, x0:x0 + size] += 1
    return total / count, p


def segmentation_scores(loaded, data, steps: int, device, progress: str = "") -> dict:
    """One model's segmentation probe on an `EvalSet`: trained on its train images, scored on its val ones."""
    K, ignore = data.num_classes, data.ignore_index
    train = [data.files[i] for i in data.train]

    def target(i: int, p: Plan) -> np.ndarray:
        j = data.train[i]
        m = read_mask(data.masks[j], data.files[j], K, ignore, data.label_map)
        return np.asarray(resized(Image.fromarray(m.astype(np.int32)), p, Image.NEAREST), dtype=np.int64)
    feats, labels = train_windows(loaded, train, target, False, device, f"{progress}: probe features")
    head = fit_probe(feats, labels, K, ignore, steps, progress=f"{progress}: segmentation probe", device=device)
    del feats, labels
    cm = torch.zeros(K, K, dtype=torch.long)
    for j in data.val:
        logits, _ = window_outputs(head, loaded, data.files[j], device)  # (K, h, w) at the working size
        truth = torch.from_numpy(read_mask(data.masks[j], data.files[j], K, ignore, data.label_map))
        pred = F.interpolate(logits[None], size=truth.shape, mode="bilinear", align_corners=False)[0].argmax(0)
        cm += confusion(pred, truth, K, ignore)
    return scores(cm)
