"""timm `VisionTransformer`: DINOv2 (with or without registers), CLIP / OpenCLIP, SigLIP, DeiT-III, ...

Absolute positional embedding, optional class token (SigLIP has none: it pools with a MAP head), optional register
tokens (`reg_tokens`). The student is `VisionTransformer(reg_tokens=R_old + R, no_embed_class=True)`: the class and
register entries of `pos_embed` (when the teacher has them) are added to the tokens themselves, which is exact
because a prefix token's input is just token + its positional entry (`Backbone.fold_state`). Registers start at the
mean patch positional embedding (`pos_mean`).
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from . import Backbone


class ViT(Backbone):
    model_class = VisionTransformer
    reg_arg = "reg_tokens"
    name = "vit"
