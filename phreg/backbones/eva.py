"""timm `Eva`: EVA-02, EVA-CLIP, DINOv3, Perception Encoder (`vit_pe_core_*`), the `vit_*_rope_*` models.

What differs from `VisionTransformer`:

* rotary position embedding (RoPE) inside attention, applied to patch tokens only: `EvaAttention` and
  `AttentionRope` skip the first `num_prefix_tokens` tokens, and timm builds them with the model's prefix count, so
  the student's new registers get no RoPE, like its class token;
* the absolute `pos_embed` may be absent (DINOv3: RoPE only) or cover the prefix tokens (EVA-02, PE:
  `no_embed_class=False`); the latter is folded exactly as for `VisionTransformer` (`Backbone.fold_state`);
* existing registers (`num_reg_tokens`; DINOv3 has 4) are not stored as an attribute: counted from `reg_token`;
* without an absolute positional embedding, registers start at the patch embedding of a grey image
  (`Backbone.default_init`; docs/models.md);
* MLPs may be SwiGLU (`fc1_g` / `fc1_x`) or packed GLU (`fc1` of twice the width);
* dense heads (`heads.py`) compute the last block's attention as `EvaAttention.forward` does: fused `qkv` with
  separate q/v biases or separate `q_proj`/`k_proj`/`v_proj`, q/k norms, RoPE on the patch tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models.eva import Eva as EvaModel

from ..errors import UsageError
from .base import Backbone


class Eva(Backbone):
    model_class = EvaModel
    reg_arg = "num_reg_tokens"
    name = "eva"

    @property
    def num_registers(self) -> int:
        return 0 if self.model.reg_token is None else int(self.model.reg_token.shape[1])

    # ------------------------------------------------------------------------------------------------- dense hooks
    def last_block_input(self, x):
        model = self.model
        x = model.patch_embed(x)
        x, rope = model._pos_embed(x)  # what forward_features does, up to the last block
        x = model.norm_pre(x)
        mixed = getattr(model, "rope_mixed", False) and rope is not None  # per-depth RoPE tables
        for i, blk in enumerate(model.blocks[:-1]):
            x = blk(x, rope=rope[i] if mixed else rope)
        return x, dict(rope=rope[-1] if mixed else rope)

    def last_block_qkv(self, tokens, ctx, need_qk=True):
        model = self.model
        attn = model.blocks[-1].attn
        x = model.blocks[-1].norm1(tokens)
        B, N, _ = x.shape
        if getattr(attn, "gate", None) is not None:  # AttentionRope's optional output gate: not read by dense heads
            raise UsageError("dense heads (naclip, maskclip) do not support gated attention (timm AttentionRope "
                             "with a gate); use head final")
        if attn.qkv is not None:
            if getattr(attn, "q_bias", None) is None:  # AttentionRope has no separate q/v biases
                qkv = attn.qkv(x)
            else:
                bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
            q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)  # grouped-query attention (AttentionRope)
            q, k, v = (proj(x).reshape(B, N, heads, -1).transpose(1, 2)
                       for proj, heads in ((attn.q_proj, attn.num_heads), (attn.k_proj, kv_heads),
                                           (attn.v_proj, kv_heads)))
        groups = getattr(attn, "num_kv_groups", 1)
        if groups > 1:  # after norm and RoPE in timm; repeating first is the same (both act per head)
            v = v.repeat_interleave(groups, dim=1)
        if not need_qk:
            return None, None, v
        q, k = attn.q_norm(q), attn.k_norm(k)
        rope = ctx.get("rope")
        if rope is not None:
            n, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
            q, k = (torch.cat([t[:, :, :n], apply_rot_embed_cat(t[:, :, n:], rope, half=half)], 2).type_as(v)
                    for t in (q, k))
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
        return q, k, v
