"""The backbone seam: everything phreg needs to know about one family of timm models, one module per family.

A family (`vit.py` for timm `VisionTransformer`, ...) subclasses `Backbone` and says how to:

* build the student: a stock timm model of the *same class* with R more register tokens, whose state is the
  teacher's own tensors (shared, not copied) plus the few that change, so that R=0 computes the teacher's function;
* start the new registers where they barely move that function (`register_init`);
* read patch tokens at a tap point (`patch_tokens`), and expose what the dense heads of `heads.py` (NACLIP,
  MaskCLIP) need: the tokens entering the last block, q/k/v of its attention, its output projection and the model's
  final norm + projection head (`last_block_input`, `last_block_qkv`, `last_block_merge`, `project`);
* name its semantic parts (`parts`: registers, class_token, pos_embed, patch_embed, last_block, norm, ...), so one
  recipe unlocks the same thing in every family.

`backbone(model)` is the family of a model, bound to it: `backbone(m).grid`, `backbone(m).patch_tokens(x)`.

Adding a family = adding one module here (a `Backbone` subclass registers itself for its timm class) and its import
below. The base class and registry are in `base.py`; the dense-head math lives once, in `heads.py`, written against
these hooks; `attention.py` switches attention between the fused and the eager path.
"""

from . import eva, vit  # noqa: F401  (each family registers itself on import)
from .base import SEMANTIC, Backbone, PatchTokens, add_registers, backbone, dense_features, patch_tokens

__all__ = ["SEMANTIC", "Backbone", "PatchTokens", "add_registers", "backbone", "dense_features", "patch_tokens"]
