"""The backbone seam: everything phreg needs to know about one family of timm models, one module per family.

A family (`vit.py` for timm `VisionTransformer`, ...) subclasses `Backbone` and says how to:

* build the student: a stock timm model of the *same class* with R more register tokens, whose state is the
  teacher's own tensors (shared, not copied) plus the few that change, so that R=0 computes the teacher's function;
* start the new registers where they barely move that function (`register_init`);
* read patch tokens at a tap point (`patch_tokens`), and expose what the dense heads of `phreg.dense` (NACLIP,
  MaskCLIP) need: the tokens entering the last block, q/k/v of its attention, its output projection and the model's
  final norm + projection head (`last_block_input`, `last_block_qkv`, `last_block_merge`, `project`);
* name its semantic parts (`parts`: registers, class_token, pos_embed, patch_embed, last_block, norm, ...), so one
  recipe unlocks the same thing in every family.

Adding a family = adding one module here: every module of this package is imported, and each `Backbone` subclass
registers itself for its timm class.
"""

from __future__ import annotations

import copy
import importlib
import math
import pkgutil

import timm
import torch

from ..errors import UsageError

FAMILIES: dict[type, "Backbone"] = {}


class Backbone:
    """One family of timm models. Subclasses set `model_class` and `reg_arg` and override what differs."""

    model_class: type  # the timm class this family covers
    reg_arg: str  # the timm constructor argument that sets the number of register tokens
    name: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if getattr(cls, "model_class", None) is not None:
            FAMILIES[cls.model_class] = cls()

    # ------------------------------------------------------------------------------------------------- geometry
    def num_registers(self, model) -> int:
        return int(getattr(model, "num_reg_tokens", 0) or 0)

    def has_class_token(self, model) -> bool:
        return getattr(model, "cls_token", None) is not None

    def num_prefix(self, model) -> int:
        return int(model.num_prefix_tokens)

    def patch_size(self, model) -> int:
        return int(model.patch_embed.patch_size[0])

    def grid(self, model) -> tuple[int, int]:
        return tuple(model.patch_embed.grid_size)

    # ------------------------------------------------------------------------------------------------- student
    def student_args(self, teacher, registers: int) -> dict:
        """Constructor arguments of the student: the teacher's, plus R registers, prefix tokens without pos-embed."""
        from timm.models import get_model_args

        return dict(get_model_args(teacher), **{self.reg_arg: self.num_registers(teacher) + registers},
                    no_embed_class=True)

    def fold_state(self, teacher) -> dict[str, torch.Tensor]:
        """The teacher's state with any prefix-token positional embedding folded into the tokens (exact)."""
        raise NotImplementedError

    def register_init(self, teacher, registers: int, init: str, noise: float, g: torch.Generator) -> torch.Tensor:
        """(1, R, D) fresh registers. "randn" is the paper's randn / sqrt(dim); families define "pos_mean"."""
        dim = teacher.embed_dim
        return torch.randn(1, registers, dim, generator=g) / math.sqrt(dim)

    def add_registers(self, teacher, registers: int, init: str = "pos_mean", noise: float = 0.02, seed: int = 0):
        """The student: the teacher's class with `registers` more register tokens.

        Built on the meta device and given the teacher's tensors with `assign=True`: every tensor the student does not
        change *is* the teacher's (no copy). Training must therefore give unlocked tensors their own storage first
        (`phreg.distill.unlock` does). Non-persistent buffers (RoPE tables, ...) are taken from the teacher too.
        """
        args = self.student_args(teacher, registers)
        arch = teacher.pretrained_cfg["architecture"]
        student = timm.create_model(arch, pretrained=False, pretrained_cfg=copy.deepcopy(teacher.pretrained_cfg),
                                    device="meta", **args)
        sd = self.fold_state(teacher)
        g = torch.Generator().manual_seed(seed)
        if registers:
            new = self.register_init(teacher, registers, init, noise, g).to(next(teacher.parameters()))
            old = sd.get("reg_token")
            sd["reg_token"] = new if old is None else torch.cat([old, new], 1)
        student.load_state_dict(sd, assign=True)
        buffers = dict(teacher.named_buffers())
        for name, buf in list(student.named_buffers()):
            if buf.is_meta:
                _set(student, name, buffers[name])
        return student.eval()

    # ------------------------------------------------------------------------------------------------- tokens
    def patch_tokens(self, model, x: torch.Tensor, tap: str = "final", sigma: float = 5.0) -> torch.Tensor:
        """Patch tokens (B, L, D), prefix tokens dropped. tap: "final" (normalized), "last_block" (pre-norm), or a
        dense head that replaces the last block ("naclip", "maskclip": see `phreg.dense`)."""
        if tap == "final":
            return model.forward_features(x)[:, self.num_prefix(model):]
        if tap == "last_block":
            return model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC",
                                               intermediates_only=True)[-1]
        from ..dense import head_tokens

        return head_tokens(model, x, tap, sigma)

    # Dense-head hooks (phreg.dense). Tokens are in timm's order: prefix tokens (class, registers) first.
    def last_block_input(self, model, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """All tokens (B, N, D) entering the last block, and what its attention needs besides them (e.g. RoPE)."""
        raise NotImplementedError

    def last_block_qkv(self, model, tokens: torch.Tensor, ctx: dict, need_qk: bool = True):
        """q, k, v (B, heads, N, d_h) of the last block's attention on `norm1(tokens)`, as its forward computes them
        (q/k norms, RoPE); q and k may be None when `need_qk` is False."""
        raise NotImplementedError

    def last_block_merge(self, model, out: torch.Tensor) -> torch.Tensor:
        """(B, heads, L, d_h) attention output -> the last block's output projection (B, L, D)."""
        raise NotImplementedError

    def project(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """The model's final norm and projection head, applied to every token: (B, L, D) -> (B, L, D_out)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------- parts
    def parts(self, model) -> dict[str, list[str]]:
        """Semantic part -> parameter-name patterns (fnmatch). A part the model lacks maps to []."""
        raise NotImplementedError


def _set(module: torch.nn.Module, dotted: str, value: torch.Tensor) -> None:
    *path, leaf = dotted.split(".")
    for p in path:
        module = getattr(module, p)
    module._buffers[leaf] = value


def backbone(model, name: str = "") -> Backbone:
    """The family of a timm model instance (exact class first, then the nearest base class)."""
    for cls in type(model).__mro__:
        if cls in FAMILIES:
            return FAMILIES[cls]
    known = " and ".join(sorted(c.__name__ for c in FAMILIES))
    what = f"model {name!r}" if name else "the model"
    raise UsageError(f"{what} is a {type(model).__name__}; phreg distills timm {known} models")


def patch_tokens(model, x: torch.Tensor, tap: str = "final", sigma: float = 5.0) -> torch.Tensor:
    return backbone(model).patch_tokens(model, x, tap, sigma)


def add_registers(teacher, registers: int, init: str = "pos_mean", noise: float = 0.02, seed: int = 0):
    return backbone(teacher).add_registers(teacher, registers, init, noise, seed)


class PatchTokens(torch.nn.Module):
    """A model whose forward() returns patch tokens, so DDP and autocast wrappers see the call."""

    def __init__(self, model, tap: str = "final", sigma: float = 5.0):
        super().__init__()
        self.model, self.tap, self.sigma = model, tap, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_tokens(self.model, x, self.tap, self.sigma)


for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
