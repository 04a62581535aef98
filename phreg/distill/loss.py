"""The distillation loss, on patch tokens only (class and register tokens are free to do what they like)."""

import torch
import torch.nn.functional as F


def distill_loss(student: torch.Tensor, target: torch.Tensor, mse_weight: float = 1.0) -> torch.Tensor:
    """(1 - cosine) + mse_weight * MSE, averaged over tokens, computed in float32."""
    s, t = student.float(), target.float()
    return (1 - F.cosine_similarity(s, t, dim=-1).mean()) + mse_weight * F.mse_loss(s, t)

