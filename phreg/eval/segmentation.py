"""Label maps scored against ground truth: one confusion matrix and one set of scores (mIoU, pixel accuracy, per-class
IoU), for the linear probe and zero-shot segmentation alike."""

from __future__ import annotations

import torch


def confusion(pred: torch.Tensor, truth: torch.Tensor, num_labels: int, ignore_index: int | None) -> torch.Tensor:
    """(K, K) counts [true, predicted] over labelled pixels with a true label below K."""
    keep = (truth >= 0) & (truth < num_labels)
    if ignore_index is not None:
        keep &= truth != ignore_index
    return torch.bincount(truth[keep] * num_labels + pred[keep], minlength=num_labels ** 2).view(num_labels, -1)


def scores(cm: torch.Tensor) -> dict:
    """mIoU over classes present in the ground truth or predictions, pixel accuracy, per-class IoU."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    present = union > 0
    return dict(miou=iou[present].mean().item(), pixel_accuracy=(tp.sum() / cm.sum().clamp(min=1)).item(),
                per_class_iou=[None if torch.isnan(v) else round(v.item(), 4) for v in iou])
