"""The backbone seam: everything phreg needs to know about one family of timm models, one module per family.

A family (`vit.py` for timm `VisionTransformer`, ...) subclasses `Backbone` and says how to:

* build the student: a stock timm model of the *same class* with R more register tokens, whose state is the
  teacher's own tensors (shared, not copied) plus the few that change, so that R=0 computes the teacher's function;
* start the new registers where they barely move that function (`register_init`);
* read patch tokens at a tap point (`patch_tokens`);
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
    def patch_tokens(self, model, x: torch.Tensor, tap: str = "final") -> torch.Tensor:
        """Patch tokens (B, L, D), prefix tokens dropped. tap: "final" (normalized) or "last_block" (pre-norm)."""
        if tap == "final":
            return model.forward_features(x)[:, self.num_prefix(model):]
        return model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True)[-1]

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


def patch_tokens(model, x: torch.Tensor, tap: str = "final") -> torch.Tensor:
    return backbone(model).patch_tokens(model, x, tap)


def add_registers(teacher, registers: int, init: str = "pos_mean", noise: float = 0.02, seed: int = 0):
    return backbone(teacher).add_registers(teacher, registers, init, noise, seed)


class PatchTokens(torch.nn.Module):
    """A model whose forward() returns patch tokens, so DDP and autocast wrappers see the call."""

    def __init__(self, model, tap: str = "final"):
        super().__init__()
        self.model, self.tap = model, tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_tokens(self.model, x, self.tap)


for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
