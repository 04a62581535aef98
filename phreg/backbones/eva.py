"""timm `Eva`: EVA-02, EVA-CLIP, DINOv3, Perception Encoder (`vit_pe_core_*`), the `vit_*_rope_*` models.

What differs from `VisionTransformer`:

* rotary position embedding (RoPE) inside attention, applied to patch tokens only: `EvaAttention` and
  `AttentionRope` skip the first `num_prefix_tokens` tokens, and timm builds them with the model's prefix count, so
  the student's new registers get no RoPE, like its class token;
* the absolute `pos_embed` may be absent (DINOv3: RoPE only) or cover the prefix tokens (EVA-02, PE:
  `no_embed_class=False`); the latter is folded exactly as for `VisionTransformer` (`Backbone.fold_state`);
* existing registers (`num_reg_tokens`; DINOv3 has 4) are not stored as an attribute: counted from `reg_token`;
* without an absolute positional embedding, registers start at the patch embedding of a grey image
  (`Backbone.default_init`, measured in README "Register init");
* MLPs may be SwiGLU (`fc1_g` / `fc1_x`) or packed GLU (`fc1` of twice the width).
"""

from __future__ import annotations

from timm.models.eva import Eva as EvaModel

from . import Backbone


class Eva(Backbone):
    model_class = EvaModel
    reg_arg = "num_reg_tokens"
    name = "eva"

    def num_registers(self, model) -> int:
        return 0 if model.reg_token is None else int(model.reg_token.shape[1])
