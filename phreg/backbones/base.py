"""`Backbone`, the base class every family subclasses, the registry that finds a model's family, and the helpers
the rest of phreg reads models through (`backbone`, `patch_tokens`, `dense_features`, `add_registers`,
`PatchTokens`)."""

from __future__ import annotations

import copy
import math
import re

import timm
import torch
import torch.nn.functional as F

from ..errors import UsageError
from . import heads
from .heads import NACLIP_SIGMA

FAMILIES: dict[type, type["Backbone"]] = {}  # timm class -> its family
# The parts a recipe can unlock by meaning, the same in every family (`Backbone.parts`).
SEMANTIC = ("registers", "class_token", "pos_embed", "patch_embed", "last_block", "last_blocks:N", "norm")


class Backbone:
    """One family of timm models, bound to one model: `backbone(model).grid`, `backbone(model).patch_tokens(x)`.

    Subclasses set `model_class` and `reg_arg` and override what differs. A handle is cheap (it holds the model and
    nothing else), so callers ask for one where they need it instead of passing the model around twice.
    """

    model_class: type  # the timm class this family covers
    reg_arg: str  # the timm constructor argument that sets the number of register tokens
    name: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if getattr(cls, "model_class", None) is not None:
            FAMILIES[cls.model_class] = cls

    def __init__(self, model: torch.nn.Module):
        self.model = model

    # ------------------------------------------------------------------------------------------------- geometry
    @property
    def num_registers(self) -> int:
        return int(getattr(self.model, "num_reg_tokens", 0) or 0)

    @property
    def has_class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    @property
    def num_prefix(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    @property
    def has_rope(self) -> bool:
        return getattr(self.model, "rope", None) is not None

    @property
    def mlp_width(self) -> int:
        """Hidden activations per token of one MLP (SwiGLU / GLU: both branches), for memory estimates."""
        mlp = self.model.blocks[0].mlp
        return sum(m.out_features for n, m in mlp.named_modules()
                   if isinstance(m, torch.nn.Linear) and not n.startswith("fc2"))

    def geometry(self) -> dict:
        """What a model card and `inspect` say about the token layout."""
        model = self.model
        return dict(prefix=self.num_prefix, registers=self.num_registers, class_token=self.has_class_token,
                    patches=model.patch_embed.num_patches, grid=list(self.grid), patch=self.patch_size,
                    width=model.embed_dim, pos_embed=getattr(model, "pos_embed", None) is not None,
                    rope=self.has_rope, family=self.name, model_class=type(model).__name__)

    # ------------------------------------------------------------------------------------------------- student
    def student_args(self, registers: int) -> dict:
        """Constructor arguments of the student: the teacher's, plus R registers, prefix tokens without pos-embed."""
        from timm.models import get_model_args

        return dict(get_model_args(self.model), **{self.reg_arg: self.num_registers + registers},
                    no_embed_class=True)

    def fold_state(self) -> dict[str, torch.Tensor]:
        """The model's state with any prefix-token positional embedding folded into the tokens (exact: a prefix
        token's input is token + its positional entry, and the student adds none to prefix tokens)."""
        model = self.model
        sd = dict(model.state_dict())
        prefix = 0 if model.no_embed_class or model.pos_embed is None else self.num_prefix
        if not prefix:
            return sd
        pos = sd["pos_embed"]
        sd["pos_embed"] = pos[:, prefix:]
        cls = int(self.has_class_token)
        if cls:
            sd["cls_token"] = sd["cls_token"] + pos[:, :1]
        if sd.get("reg_token") is not None:
            sd["reg_token"] = sd["reg_token"] + pos[:, cls:prefix]
        return sd

    def patch_pos_embed(self) -> torch.Tensor | None:
        """(1, L, D) absolute positional embedding of the patch cells, or None (RoPE-only models)."""
        model = self.model
        if getattr(model, "pos_embed", None) is None:
            return None
        prefix = 0 if model.no_embed_class else self.num_prefix
        return model.pos_embed[:, prefix:]

    def default_init(self) -> str:
        """What `register_init: auto` means for this model (docs/models.md; benchmarks/register_init.py measures the
        candidates): the mean patch positional embedding where there is one; else the patch embedding of a grey
        image, the position-free candidate that starts closest to the teacher."""
        return "pos_mean" if self.patch_pos_embed() is not None else "grey_patch"

    def init_candidates(self) -> dict[str, torch.Tensor]:
        """(1, D) starting points for fresh registers, each a token that should move the model's function little.

        pos_mean: the mean patch positional embedding (a token without content at the average position);
        class_token: the (folded) class token; register_mean: the mean of the model's own registers;
        grey_patch: the mean input token of a constant image at the normalization mean (patch embedding of zeros,
        plus the mean positional embedding where there is one); zeros.
        """
        model = self.model
        dim = model.embed_dim
        ref = next(model.parameters())
        out: dict[str, torch.Tensor] = {"zeros": torch.zeros(1, dim, device=ref.device)}
        pos = self.patch_pos_embed()
        if pos is not None:
            out["pos_mean"] = pos.detach().float().mean(1)
        folded = self.fold_state() if self.has_class_token or self.num_registers else None
        if self.has_class_token:
            out["class_token"] = folded["cls_token"].detach().float()[:, 0]
        if self.num_registers:
            out["register_mean"] = folded["reg_token"].detach().float().mean(1)
        with torch.no_grad():
            size = model.patch_embed.img_size
            grey = model.patch_embed(torch.zeros(1, model.patch_embed.proj.in_channels, *size, device=ref.device,
                                                 dtype=ref.dtype)).float().reshape(1, -1, dim).mean(1)
        out["grey_patch"] = grey + (out["pos_mean"] if pos is not None else 0)
        return out

    def register_init(self, registers: int, init: str, noise: float, g: torch.Generator) -> torch.Tensor:
        """(1, R, D) fresh registers: "randn" is the paper's randn / sqrt(dim); the others start every register at one
        of `init_candidates` (+ `noise` x the spread of what it was taken from, so registers can differentiate);
        "auto" is `default_init`."""
        dim = self.model.embed_dim
        if init == "randn":
            return torch.randn(1, registers, dim, generator=g) / math.sqrt(dim)
        init = self.default_init() if init == "auto" else init
        candidates = self.init_candidates()
        if init not in candidates:
            raise UsageError(f"recipe key model.register_init: {type(self.model).__name__} has no {init} to start "
                             f"registers from; choose auto, randn or one of {', '.join(sorted(candidates))}")
        base = candidates[init].cpu()
        return base[:, None].expand(1, registers, dim) + noise * self._spread() * torch.randn(1, registers, dim,
                                                                                             generator=g)

    def _spread(self) -> float:
        """The scale of the symmetry-breaking noise: the std of the positional embedding where there is one, else of
        the patch tokens entering the first block."""
        pos = self.patch_pos_embed()
        if pos is not None:
            return pos.detach().float().std().item()
        w = self.model.patch_embed.proj.weight.detach().float()
        return (w.std() * math.sqrt(w[0].numel() / 3)).item()  # ~ token std for unit-variance normalized pixels

    def add_registers(self, registers: int, init: str = "auto", noise: float = 0.02, seed: int = 0):
        """The student: this (teacher) model's class with `registers` more register tokens.

        Built on the meta device and given the teacher's tensors with `assign=True`: every tensor the student does not
        change *is* the teacher's (no copy). Training must therefore give unlocked tensors their own storage first
        (`phreg.distill.unlock` does). Non-persistent buffers (RoPE tables, ...) are taken from the teacher too.
        """
        teacher = self.model
        args = self.student_args(registers)
        arch = teacher.pretrained_cfg["architecture"]
        student = timm.create_model(arch, pretrained=False, pretrained_cfg=copy.deepcopy(teacher.pretrained_cfg),
                                    device="meta", **args)
        sd = self.fold_state()
        g = torch.Generator().manual_seed(seed)
        if registers:
            new = self.register_init(registers, init, noise, g).to(next(teacher.parameters()))
            old = sd.get("reg_token")
            sd["reg_token"] = new if old is None else torch.cat([old, new], 1)
        student.load_state_dict(sd, assign=True)
        buffers = dict(teacher.named_buffers())
        for name, buf in list(student.named_buffers()):
            if buf.is_meta:
                _set(student, name, buffers[name])
        return student.eval()

    # ------------------------------------------------------------------------------------------------- tokens
    def patch_tokens(self, x: torch.Tensor, tap: str = "final", sigma: float = NACLIP_SIGMA) -> torch.Tensor:
        """Patch tokens (B, L, D), prefix tokens dropped. tap: "final" (normalized), "last_block" (pre-norm), or a
        dense head that replaces the last block ("naclip", "maskclip": see `phreg.backbones.heads`)."""
        if tap == "final":
            return self.model.forward_features(x)[:, self.num_prefix:]
        if tap == "last_block":
            return self.model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC",
                                                    intermediates_only=True)[-1]
        return heads.head_tokens(self, x, tap, sigma)

    def head_dim(self, head: str = "final") -> int:
        """Width of the features a head returns: the model's width, or its projection's (CLIP ViT-B/16: 768 vs 512)."""
        return heads.head_dim(self, head)

    # Dense-head hooks (phreg.backbones.heads). Tokens are in timm's order: prefix tokens (class, registers) first.
    def last_block_input(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """All tokens (B, N, D) entering the last block, and what its attention needs besides them (e.g. RoPE)."""
        raise NotImplementedError

    def last_block_qkv(self, tokens: torch.Tensor, ctx: dict, need_qk: bool = True):
        """q, k, v (B, heads, N, d_h) of the last block's attention on `norm1(tokens)`, as its forward computes them
        (q/k norms, RoPE); q and k may be None when `need_qk` is False."""
        raise NotImplementedError

    def last_block_merge(self, out: torch.Tensor) -> torch.Tensor:
        """(B, heads, L, d_h) attention output -> the last block's output projection (B, L, D), as timm's `Attention`,
        `EvaAttention` and `AttentionRope` do it (their `norm` is an identity unless scale-norm is on)."""
        attn = self.model.blocks[-1].attn
        B, H, L, d = out.shape
        return attn.proj(attn.norm(out.transpose(1, 2).reshape(B, L, H * d)))

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's final norm and projection head, applied to every token: (B, L, D) -> (B, L, D_out).
        timm's order: `norm`, then the pool (a MAP head, SigLIP / Perception Encoder: per token), `fc_norm`, `head`
        (CLIP: `ln_post` and `proj`; DINOv2: the norm only, its head is the identity)."""
        model = self.model
        x = model.norm(tokens)
        if getattr(model, "attn_pool", None) is not None:
            x = map_head_per_token(model.attn_pool, x)
        return model.head(model.fc_norm(x))

    def block_outputs(self, x: torch.Tensor, last: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final features and the pre-norm outputs (B, N, D), prefix tokens included, of the last `last` blocks."""
        prefix = self.num_prefix
        final, inter = self.model.forward_intermediates(x, indices=last, return_prefix_tokens=prefix > 0, norm=False,
                                                        output_fmt="NLC")
        return final, [torch.cat([p, s], 1) for s, p in inter] if prefix else list(inter)

    # ------------------------------------------------------------------------------------------------- parts
    def parts(self) -> dict[str, list[str]]:
        """Semantic part -> parameter-name patterns (fnmatch). A part the model lacks maps to [].

        `patch_embed` is the patch-embedding conv (weight, and bias where there is one), as the paper unlocks it: a
        norm inside the patch embedding or before the blocks (`norm_pre`, CLIP / PE) acts like the first block's
        input norm and stays frozen; unlock it by name if wanted. `norm` is the final norm (absent where timm pools
        with `fc_norm` instead, e.g. EVA-02 classifiers).
        """
        model = self.model
        last = len(model.blocks) - 1
        return dict(
            registers=["reg_token"] if getattr(model, "reg_token", None) is not None else [],
            class_token=["cls_token"] if self.has_class_token else [],
            pos_embed=["pos_embed"] if getattr(model, "pos_embed", None) is not None else [],
            patch_embed=["patch_embed.proj.*"],
            last_block=[f"blocks.{last}.*"],
            norm=["norm.*"] if any(True for _ in model.norm.parameters()) else [],
        )

    def blocks(self) -> list[str]:
        """Parameter-name prefix of every transformer block, first to last (`last_blocks:N` takes the last N)."""
        return [f"blocks.{i}." for i in range(len(self.model.blocks))]

    def part_patterns(self, name: str) -> list[str] | None:
        """Patterns of a semantic part ([] if the model lacks it), or None if `name` is not a semantic name."""
        m = re.fullmatch(r"last_blocks:(\d+)", name)
        if m:
            n, blocks = int(m.group(1)), self.blocks()
            if not 1 <= n <= len(blocks):
                raise UsageError(f"recipe key train.unlock names {name}, but the model has {len(blocks)} blocks")
            return [b + "*" for b in blocks[-n:]]
        parts = self.parts()
        return parts[name] if name in parts else None

    def resolve(self, patterns: list[str], notes: list[str] | None = None) -> list[str]:
        """Semantic names -> the family's patterns; `blocks.-1.*` -> `blocks.11.*`. Parts the model lacks are
        dropped (and named in `notes`)."""
        depth = len(self.model.blocks)
        out = []
        for p in patterns:
            semantic = self.part_patterns(p)
            if semantic is None:
                out.append(re.sub(r"blocks\.(-\d+)", lambda m: f"blocks.{depth + int(m.group(1))}", p))
            elif semantic:
                out += semantic
            elif notes is not None:
                arch = (getattr(self.model, "pretrained_cfg", None) or {}).get("architecture")
                notes.append(f"{p}: skipped, {type(self.model).__name__} {f'({arch})' if arch else ''} has none")
        return out

    # ------------------------------------------------------------------------------------------------- internals
    def attention(self, block: int = -1) -> torch.nn.Module:
        """The attention module of a block (timm's eager path applies `attn_drop` to the softmax weights)."""
        return self.model.blocks[block].attn


def map_head_per_token(pool, x: torch.Tensor) -> torch.Tensor:
    """A MAP head (timm `AttentionPoolLatent`: SigLIP, Perception Encoder) applied to every token on its own.

    Attention over a single token is the identity, so each token takes the value path, the output projection and the
    residual MLP: what the pooled embedding, and so the text tower, sees of one token (MaskCLIP's reading of CLIP's
    attention-pool ResNets). The pool's own `pos_embed`, where present, is per pooled position and is left out."""
    dim = x.shape[-1]
    x = pool.proj(F.linear(x, pool.kv.weight[dim:], None if pool.kv.bias is None else pool.kv.bias[dim:]))
    return x if pool.mlp is None else x + pool.mlp(pool.norm(x))


def _set(module: torch.nn.Module, dotted: str, value: torch.Tensor) -> None:
    *path, leaf = dotted.split(".")
    for p in path:
        module = getattr(module, p)
    module._buffers[leaf] = value


def backbone(model, name: str = "") -> Backbone:
    """The family of a timm model instance (exact class first, then the nearest base class), bound to it."""
    for cls in type(model).__mro__:
        if cls in FAMILIES:
            return FAMILIES[cls](model)
    known = " and ".join(sorted(c.__name__ for c in FAMILIES))
    what = f"model {name!r}" if name else "the model"
    raise UsageError(f"{what} is a {type(model).__name__}; phreg distills timm {known} models")


def patch_tokens(model, x: torch.Tensor, tap: str = "final", sigma: float = NACLIP_SIGMA) -> torch.Tensor:
    return backbone(model).patch_tokens(x, tap, sigma)


def dense_features(model, images: torch.Tensor, head: str = "final", sigma: float = NACLIP_SIGMA) -> torch.Tensor:
    """Dense features (B, gh, gw, D) of `model` through a dense head (`heads.py`); `images` normalized (B, 3, H, W)."""
    bb = backbone(model)
    p = bb.patch_size
    tokens = bb.patch_tokens(images, head, sigma)
    return tokens.reshape(len(images), images.shape[-2] // p, images.shape[-1] // p, tokens.shape[-1])


def add_registers(teacher, registers: int, init: str = "auto", noise: float = 0.02, seed: int = 0):
    return backbone(teacher).add_registers(registers, init, noise, seed)


class PatchTokens(torch.nn.Module):
    """A model whose forward() returns patch tokens, so DDP and autocast wrappers see the call."""

    def __init__(self, model, tap: str = "final", sigma: float = NACLIP_SIGMA):
        super().__init__()
        self.model, self.tap, self.sigma = model, tap, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_tokens(self.model, x, self.tap, self.sigma)
