"""timm `VisionTransformer`: DINOv2 (with or without registers), CLIP / OpenCLIP, SigLIP, DeiT-III, ...

Absolute positional embedding, optional class token, optional register tokens (`reg_tokens`). The student is
`VisionTransformer(reg_tokens=R_old + R, no_embed_class=True)`: the class and register entries of `pos_embed` (when
the teacher has them) are added to the tokens themselves, which is exact because a prefix token's input is just
token + its positional entry.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from . import Backbone


class ViT(Backbone):
    model_class = VisionTransformer
    reg_arg = "reg_tokens"
    name = "vit"

    def fold_state(self, teacher) -> dict[str, torch.Tensor]:
        sd = dict(teacher.state_dict())
        prefix = 0 if teacher.no_embed_class else teacher.num_prefix_tokens
        if not prefix:
            return sd
        pos = sd["pos_embed"]
        sd["pos_embed"] = pos[:, prefix:]
        cls = int(self.has_class_token(teacher))
        if cls:
            sd["cls_token"] = sd["cls_token"] + pos[:, :1]
        if sd.get("reg_token") is not None:
            sd["reg_token"] = sd["reg_token"] + pos[:, cls:prefix]
        return sd

    def register_init(self, teacher, registers, init, noise, g):
        """pos_mean: every register starts at the mean patch positional embedding (+ `noise` x its spread, so
        registers can differentiate): a token with no content, which barely moves the teacher's function."""
        if init == "randn":
            return super().register_init(teacher, registers, init, noise, g)
        prefix = 0 if teacher.no_embed_class else teacher.num_prefix_tokens
        pos = teacher.pos_embed[:, prefix:].detach().float()
        dim = pos.shape[-1]
        return pos.mean(1, keepdim=True).expand(1, registers, dim) + noise * pos.std() * torch.randn(
            1, registers, dim, generator=g)

    def parts(self, model) -> dict[str, list[str]]:
        last = len(model.blocks) - 1
        return dict(
            registers=["reg_token"] if model.reg_token is not None else [],
            class_token=["cls_token"] if model.cls_token is not None else [],
            pos_embed=["pos_embed"] if model.pos_embed is not None else [],
            patch_embed=["patch_embed.*"],
            last_block=[f"blocks.{last}.*"],
            norm=["norm.*"] if any(True for _ in model.norm.parameters()) else [],
        )
