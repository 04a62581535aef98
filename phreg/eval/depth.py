"""The depth probe (`phreg eval --depth DIR`, `--dataset nyu:DIR`), as the PH-Reg paper configures it on NYUv2
(DINOv2's linear depth head): the last block's normalized patch tokens with the class token concatenated to each, a
BatchNorm and a 1x1 linear layer to 256 bins spread uniformly over 0.001-10 m, upsampled 4x; the prediction is the
bins' expectation under ReLU(logits) + 0.1, normalized (AdaBins' "linear" norm). Trained with the scale-invariant
log loss (SigLoss) + 0.5 x a multi-scale gradient loss on log depth, AdamW (lr 5e-3, weight decay 1e-2, none on the
BatchNorm), cosine schedule with linear warmup, gradients clipped at 35; tested with a horizontal flip. Windows,
features and the training loop are `probe.py`'s.

Scored per image on pixels with ground truth in (0.001, max_depth) m (and inside the Eigen crop for NYUv2), then
averaged over images: delta < 1.25 / 1.25² / 1.25³, AbsRel, RMSE, log10 (the paper's metrics).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .datasets import MIN_DEPTH
from .inputs import read_depth
from .probe import LinearHead, Plan, STEPS, cosine_warmup, feature_width, resized, train_head, train_windows, \
    window_outputs

BINS = 256
UPSAMPLE = 4  # the head's output is upsampled 4x before the bins' expectation (the config's `upsample=4`)
DEPTH = dict(lr=5e-3, weight_decay=1e-2, clip=35.0, gradient_weight=0.5)  # the paper: 30k iterations
SIG_EPS, SIG_VARIANCE = 1e-3, 0.15  # SigLoss: sqrt(var(g) + 0.15 mean(g)^2), g = log(pred + eps) - log(gt + eps)
WARM_STEPS = 100 / 30_000  # SigLoss starts on the mean term alone for its first 100 of 30k iterations


def upsampling(n: int, factor: int = UPSAMPLE) -> torch.Tensor:
    """(factor n, n): bilinear upsampling (align_corners=False) along one axis, as a matrix."""
    return F.interpolate(torch.eye(n)[None], scale_factor=factor, mode="linear", align_corners=False)[0].T.contiguous()


def bins_to_depth(logits: torch.Tensor, max_depth: float, min_depth: float = MIN_DEPTH) -> torch.Tensor:
    """(B, 256, h, w) logits -> (B, 1, 4h, 4w) depth in metres: the bins' expectation under relu(logits) + 0.1
    (normalized), after bilinear 4x upsampling. Written as matrix products (upsampling rows and columns, then the
    weighted sum and the normalizer at once): twice as fast on a CPU as interpolate + a division over all bins."""
    b, k, h, w = logits.shape
    rows, cols = upsampling(h).to(logits), upsampling(w).to(logits)
    weights = torch.relu(rows @ logits @ cols.T)  # (B, 256, 4h, 4w)
    bins = torch.linspace(min_depth, max_depth, k, device=logits.device, dtype=logits.dtype)
    num, den = (torch.stack([bins, torch.ones_like(bins)]) @ weights.flatten(2)).unbind(1)
    return ((num + 0.1 * bins.sum()) / (den + 0.1 * k)).view(b, 1, UPSAMPLE * h, UPSAMPLE * w)


def sigloss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, warm: bool = False) -> torch.Tensor:
    """The scale-invariant log loss over the valid pixels of a batch (one variance over all of them)."""
    g = torch.log(pred[valid] + SIG_EPS) - torch.log(gt[valid] + SIG_EPS)
    if g.numel() < 2:
        return pred.sum() * 0
    d = SIG_VARIANCE * g.mean() ** 2 if warm else g.var() + SIG_VARIANCE * g.mean() ** 2
    return torch.sqrt(d)


def gradient_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """MegaDepth's gradient matching on log depth, at 4 scales (every 1st, 2nd, 4th, 6th pixel), differences two
    pixels apart, over valid pairs only, each scale divided by its valid-pixel count. (B, H, W) inputs."""
    total = pred.sum() * 0
    for s in (1, 2, 4, 6):
        p, t, m = pred[:, ::s, ::s], gt[:, ::s, ::s], valid[:, ::s, ::s].float()
        n = m.sum()
        if n == 0:
            continue
        d = (torch.log(p + SIG_EPS) - torch.log(t + SIG_EPS)) * m
        v = (d[:, :-2] - d[:, 2:]).abs() * m[:, :-2] * m[:, 2:]
        h = (d[:, :, :-2] - d[:, :, 2:]).abs() * m[:, :, :-2] * m[:, :, 2:]
        total = total + (v.sum() + h.sum()) / n
    return total


def depth_loss(max_depth: float, steps: int):
    """The training loss of the depth probe: SigLoss + 0.5 x gradient loss at the targets' resolution."""
    warm = round(WARM_STEPS * steps)

    def loss(logits: torch.Tensor, gt: torch.Tensor, step: int) -> torch.Tensor:
        gt = gt.float()
        pred = F.interpolate(bins_to_depth(logits, max_depth), size=gt.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0]
        valid = (gt > 0) & (gt <= max_depth)
        return sigloss(pred, gt, valid, step < warm) + DEPTH["gradient_weight"] * gradient_loss(pred, gt, valid)
    return loss


def fit_depth(feats: torch.Tensor, depth: torch.Tensor, max_depth: float, steps: int = STEPS, seed: int = 0,
              progress: str | None = None, device="cpu") -> torch.nn.Module:
    """feats (N, C, gh, gw), depth (N, H, W) in metres (0: unknown) -> the trained head (logits over the bins)."""
    head = LinearHead(feats.shape[1], BINS, torch.Generator().manual_seed(seed))
    return train_head(head, feats, depth, depth_loss(max_depth, steps), steps, DEPTH["lr"], DEPTH["weight_decay"],
                      cosine_warmup, clip=DEPTH["clip"], seed=seed, progress=progress, decay_norm=False,
                      device=device)


# ---------------------------------------------------------------------------------------------------- metrics

METRICS = ("delta1", "delta2", "delta3", "abs_rel", "rmse", "log10")


def depth_errors(gt: np.ndarray, pred: np.ndarray, valid: np.ndarray) -> dict | None:
    """One image's errors over its valid pixels (None when it has none): the share of pixels within 1.25x,
    1.25²x, 1.25³x of the truth, mean |pred - gt| / gt, root mean squared error (m), mean |log10 pred - log10 gt|."""
    g, p = gt[valid].astype(np.float64), pred[valid].astype(np.float64)
    if g.size == 0:
        return None
    ratio = np.maximum(g / p, p / g)
    return dict(delta1=float((ratio < 1.25).mean()), delta2=float((ratio < 1.25 ** 2).mean()),
                delta3=float((ratio < 1.25 ** 3).mean()), abs_rel=float(np.mean(np.abs(g - p) / g)),
                rmse=float(np.sqrt(np.mean((g - p) ** 2))), log10=float(np.mean(np.abs(np.log10(g) - np.log10(p)))))


def valid_pixels(gt: np.ndarray, max_depth: float, crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Pixels scored: ground truth in (0.001, max_depth) m, inside `crop` (top, bottom, left, right) when given."""
    valid = (gt > MIN_DEPTH) & (gt < max_depth)
    if crop is not None:
        inside = np.zeros_like(valid)
        inside[crop[0]:crop[1], crop[2]:crop[3]] = True
        valid &= inside
    return valid


def mean_errors(per_image: list[dict | None]) -> dict:
    """The metrics averaged over the images that had valid pixels (the paper's protocol)."""
    scored = [e for e in per_image if e is not None]
    out = {k: float(np.mean([e[k] for e in scored])) if scored else math.nan for k in METRICS}
    return dict(out, images_scored=len(scored))


# ---------------------------------------------------------------------------------------------------- the probe

def depth_scores(loaded, data, steps: int, device, progress: str = "", keep: int = 0) -> tuple[dict, list]:
    """One model's depth probe on an `EvalSet`: trained on its train images, scored on its val ones. Returns the
    mean errors and the predictions (metres, at the ground truth's size) of the first `keep` val images."""
    model = loaded.model.to(device).eval()

    def target(i: int, p: Plan) -> np.ndarray:
        j = data.train[i]
        gt = read_depth(data.depth[j], data.depth_scale)
        return np.asarray(resized(Image.fromarray(gt), p, Image.NEAREST), dtype=np.float16)
    train = [data.files[i] for i in data.train]
    feats, depth = train_windows(loaded, train, target, True, device, f"{progress}: depth features")
    head = fit_depth(feats, depth, data.max_depth, steps, progress=f"{progress}: depth probe", device=device)
    del feats, depth
    per_image, shown = [], []
    for j in data.val:
        gt = read_depth(data.depth[j], data.depth_scale)
        pred, _ = window_outputs(head, loaded, data.files[j], device, with_cls=True, flip=True,
                                 out=lambda y: bins_to_depth(y, data.max_depth))
        pred = F.interpolate(pred[None], size=gt.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
        per_image.append(depth_errors(gt, pred, valid_pixels(gt, data.max_depth, data.eval_crop)))
        if len(shown) < keep:
            shown.append(pred)
    return dict(mean_errors(per_image), feature_width=feature_width(model, True)), shown
