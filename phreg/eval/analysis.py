"""Everything `inspect` reports about one model on a set of images, computed in batched passes.

One forward per batch gives the pre-norm outputs of the last few blocks and the final features; one more forward of
all TTA views gives the model's own denoised features. Per-image maps (norms, PCA, CLS attention) are kept only for the
images that get a picture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backbones import backbone
from ..config.recipe import ViewsCfg
from ..models.specs import Loaded
from ..targets.heldout import HeldOut
from ..targets.teacher import DenoisedTeacher
from .tokens import DARCET_THRESHOLD, collect, neighbour_cosine, outlier_threshold


@dataclass
class Analysis:
    name: str
    grid: tuple[int, int]
    registers: int
    class_token: bool
    norms: dict[str, dict[str, torch.Tensor]]  # layer ("block 11", "final") -> kind -> (B, n) token norms
    artifact_layer: str  # the layer whose patch norms decide outliers: the last block, pre-norm
    neighbour_cos: torch.Tensor  # (B, L), final patch features
    cls_final: torch.Tensor | None  # (B, D) final normalized class token
    tta: HeldOut  # raw vs own TTA-denoised features
    maps: list[dict] = field(default_factory=list)  # per pictured image: norm (gh, gw), patches (L, D), attn

    @property
    def patch_norms(self) -> torch.Tensor:
        return self.norms[self.artifact_layer]["patch"]

    def outliers(self, threshold: float | None = None) -> dict:
        """High-norm patch tokens under the data-derived rule, or under a given threshold (e.g. the teacher's)."""
        rule = outlier_threshold(self.patch_norms)
        t = rule["threshold"] if threshold is None else threshold
        mask = self.patch_norms > t
        positions = mask.float().mean(0).view(*self.grid)
        n = self.patch_norms
        return dict(
            layer=self.artifact_layer, threshold=t, rule=rule, fraction=mask.float().mean().item(),
            images_with_outliers=int(mask.any(1).sum()), per_image=mask.float().mean(1).tolist(),
            darcet_150_fraction=(n > DARCET_THRESHOLD).float().mean().item(),
            max_over_median=(n.max() / n.median()).item(),
            neighbour_cos_outliers=self.neighbour_cos[mask].mean().item() if mask.any() else None,
            neighbour_cos_others=self.neighbour_cos[~mask].mean().item(),
            position_frequency=positions.tolist(), mask=mask)

    def summary(self, threshold: float | None = None) -> dict:
        out = self.outliers(threshold)
        out.pop("mask")
        layers = {layer: {kind: _stats(v) for kind, v in kinds.items() if v.numel()}
                  for layer, kinds in self.norms.items()}
        return dict(model=self.name, grid=list(self.grid), registers=self.registers, class_token=self.class_token,
                    images=len(self.patch_norms),
                    norms=layers, outliers=out,
                    tta_noise=dict(mean_1_minus_cos=self.tta.teacher_distance,
                                   per_image=self.tta.teacher_distances.tolist()))


def _stats(v: torch.Tensor) -> dict:
    v = v.float().flatten()
    q = torch.quantile(v, torch.tensor([0.5, 0.99]))
    return dict(mean=v.mean().item(), median=q[0].item(), p99=q[1].item(), max=v.max().item())


@torch.no_grad()
def analyze(loaded: Loaded, images: torch.Tensor, views: ViewsCfg, seed: int = 0, layers: int = 4,
            pictures: int = 8, batch_size: int = 8, device="cpu", progress: bool = True) -> Analysis:
    from tqdm.auto import tqdm

    model = loaded.model.to(device)
    norms: dict[str, dict[str, list]] = {}
    nbr, cls, maps = [], [], []
    label = Path(loaded.name).name or loaded.name
    for start in tqdm(range(0, len(images), batch_size), desc=f"{label}: tokens", unit="batch", leave=False,
                      disable=not progress):
        x = images[start:start + batch_size].to(device)
        tok = collect(model, x, layers, class_attention=len(maps) < pictures)
        depth = max(tok.blocks)
        for name, t in [*((f"block {i}", v) for i, v in tok.blocks.items()), ("final", tok.final)]:
            n = t.float().norm(dim=-1)
            for kind in ("patch", "cls", "reg"):
                norms.setdefault(name, {}).setdefault(kind, []).append(tok.kind(n, kind).cpu())
        patches = tok.kind(tok.final, "patch")
        nbr.append(neighbour_cosine(patches, tok.grid).cpu())
        if tok.num_cls:
            cls.append(tok.final[:, 0].float().cpu())
        if len(maps) < pictures:
            attn = tok.attention  # None without a class token (SigLIP): no attention picture
            last = tok.kind(tok.blocks[depth], "patch").float().norm(dim=-1)
            for i in range(min(len(x), pictures - len(maps))):
                maps.append(dict(norm=last[i].view(tok.grid).cpu(), patches=patches[i].float().cpu(),
                                 attn=attn[i].view(tok.grid).cpu() if attn is not None else None))
    norms_t = {layer: {k: torch.cat(v) for k, v in kinds.items()} for layer, kinds in norms.items()}
    denoiser = DenoisedTeacher(model, views, loaded.mean, loaded.std).to(device)
    tta = HeldOut.from_images(images, denoiser, seed, device, "final", batch_size,
                              progress=f"{label}: {views.num} TTA views" if progress else None)
    return Analysis(loaded.name, tok.grid, backbone(model).num_registers, bool(tok.num_cls), norms_t,
                    f"block {depth}", torch.cat(nbr),
                    torch.cat(cls) if cls else None, tta, maps)


def to_rgb(image: torch.Tensor, mean, std) -> np.ndarray:
    """Normalized (C, H, W) tensor back to uint8 (H, W, 3) for pictures."""
    x = image.float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
