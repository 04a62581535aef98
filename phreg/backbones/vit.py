"""timm `VisionTransformer`: DINOv2 (with or without registers), CLIP / OpenCLIP, SigLIP, DeiT-III, ...

Absolute positional embedding, optional class token (SigLIP has none: it pools with a MAP head), optional register
tokens (`reg_tokens`). The student is `VisionTransformer(reg_tokens=R_old + R, no_embed_class=True)`: the class and
register entries of `pos_embed` (when the teacher has them) are added to the tokens themselves, which is exact
because a prefix token's input is just token + its positional entry (`Backbone.fold_state`). Registers start at the
mean patch positional embedding (`pos_mean`).

Dense heads: the "final norm and projection head" is `norm` -> `fc_norm` -> `head` (CLIP: `ln_post` and `proj`;
DINOv2: the norm only, its head is the identity). A model with a MAP head instead (SigLIP: `attn_pool`) projects
every token through the MAP head's value path with identity attention (`proj(v)` plus its residual MLP), the way
MaskCLIP reads CLIP's attention-pool ResNets: the pooled embedding is what the text tower was trained against.
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from .base import Backbone


class ViT(Backbone):
    model_class = VisionTransformer
    reg_arg = "reg_tokens"
    name = "vit"

    # ------------------------------------------------------------------------------------------------- dense hooks
    def last_block_input(self, x):
        model = self.model
        x = model.patch_embed(x)
        x = model._pos_embed(x)  # what forward_features does, up to the last block
        x = model.patch_drop(x)
        x = model.norm_pre(x)
        for blk in model.blocks[:-1]:
            x = blk(x)
        return x, {}

    def last_block_qkv(self, tokens, ctx, need_qk=True):
        model = self.model
        attn = model.blocks[-1].attn
        B, N, _ = tokens.shape
        qkv = attn.qkv(model.blocks[-1].norm1(tokens)).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if not need_qk:
            return None, None, v
        return attn.q_norm(q), attn.k_norm(k), v
