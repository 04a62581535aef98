"""Teacher and student: a pretrained timm VisionTransformer and the same network with fresh register tokens.

Weights are found, in order, at: `model.checkpoint` (a file), a `local-dir:` / `hf-hub:` model name, a file named after
the model in the checkpoints folder (`$PHREG_CHECKPOINTS`, default `./checkpoints`), or timm's own download.
The student *is* a stock timm `VisionTransformer(reg_tokens=R, no_embed_class=True)`, so its export loads in timm with
no phreg code. Folding the class entry of `pos_embed` into `cls_token` is exact, which is why a student with R=0
computes the teacher's function.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config
from timm.models import get_model_args
from timm.models.vision_transformer import VisionTransformer

from .errors import UsageError
from .recipe import ModelCfg, UnlockGroup

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")


def checkpoints_dir() -> Path:
    return Path(os.environ.get("PHREG_CHECKPOINTS", "checkpoints"))


def find_local_weights(name: str) -> Path | None:
    """`checkpoints/<name>.<ext>`, also without the pretrained tag (`vit_small_patch14_dinov2.lvd142m` -> base)."""
    folder = checkpoints_dir()
    for stem in dict.fromkeys([name, name.split(".")[0]]):
        for suffix in WEIGHT_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    detail = next((ln.strip() for ln in text if "size mismatch" in ln or "Missing key" in ln), text[0] if text else "")
    return f"{type(e).__name__}: {detail[:300]}"


def _create(name: str, **kwargs) -> VisionTransformer:
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as e:  # timm raises many types for unknown names, bad hubs, bad files
        raise UsageError(f"could not build model {name!r}: {_first_line(e)}") from None
    if not isinstance(model, VisionTransformer):
        raise UsageError(f"model {name!r} is a {type(model).__name__}; phreg distills timm VisionTransformer models")
    return model


def check_img_size(model: VisionTransformer, img_size: int) -> None:
    p = model.patch_embed.patch_size[0]
    if img_size % p:
        lo, hi = (img_size // p) * p, (img_size // p + 1) * p
        raise UsageError(f"model.img_size={img_size} is not a multiple of the patch size {p}; "
                         f"nearest valid sizes: {', '.join(str(s) for s in (lo, hi) if s > 0)}")


def load_teacher(cfg: ModelCfg) -> VisionTransformer:
    """Build the pretrained model at the recipe's resolution (timm resamples `pos_embed`), frozen, in eval mode."""
    name, size = cfg.name, cfg.img_size
    source = name.split(":", 1)[0] if ":" in name else ""
    if source and source not in ("local-dir", "hf-hub"):
        raise UsageError(f"model.name {name!r}: only the prefixes local-dir: and hf-hub: are understood")
    if not source and not timm.is_model(name):
        raise UsageError(f"model.name {name!r} is not a timm model (see timm.list_models('*dinov2*'))")
    file = Path(cfg.checkpoint) if cfg.checkpoint else (None if source else find_local_weights(name))
    if cfg.checkpoint and not file.is_file():
        raise UsageError(f"model.checkpoint {file} not found")
    check_img_size(_create(name, pretrained=False, device="meta"), size)  # architecture only: no weights, no memory
    if file is not None:
        try:
            model = timm.create_model(name, img_size=size, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
        except Exception as e:
            raise UsageError(f"checkpoint {file} does not fit {name}: {_first_line(e)}") from None
    else:
        try:
            model = _create(name, img_size=size, pretrained=True)
        except UsageError as e:
            where = checkpoints_dir() / f"{name.split('.')[0]}.safetensors"
            raise UsageError(f"no weights for {name}: pass model.checkpoint=FILE or put the file at {where} "
                             f"(download failed: {str(e).split(': ', 2)[-1]})") from None
    model.eval().requires_grad_(False)
    return model


def add_registers(teacher: VisionTransformer, registers: int, init: str = "pos_mean", noise: float = 0.02,
                  seed: int = 0) -> VisionTransformer:
    """A copy of `teacher` with `registers` fresh register tokens that get no positional embedding.

    init="randn" is the paper's (randn / sqrt(dim)). init="pos_mean" starts every register at the mean patch
    positional embedding (plus `noise` x its spread, so registers can differentiate): a token with no content that
    barely moves the teacher's function, so training starts at the teacher instead of far from it.
    """
    args = dict(get_model_args(teacher), reg_tokens=teacher.num_reg_tokens + registers, no_embed_class=True)
    arch = teacher.pretrained_cfg["architecture"]
    student = timm.create_model(arch, pretrained=False, pretrained_cfg=copy.deepcopy(teacher.pretrained_cfg), **args)

    sd = {k: v.clone() for k, v in teacher.state_dict().items()}
    prefix = 0 if teacher.no_embed_class else teacher.num_prefix_tokens
    pos_prefix, pos_patch = sd["pos_embed"][:, :prefix], sd["pos_embed"][:, prefix:]
    sd["pos_embed"] = pos_patch
    cls = 1 if teacher.has_class_token else 0
    if cls and prefix:
        sd["cls_token"] = sd["cls_token"] + pos_prefix[:, :1]
    old_reg = sd.get("reg_token")
    if old_reg is not None and prefix:
        old_reg = old_reg + pos_prefix[:, cls:]
    g = torch.Generator().manual_seed(seed)
    dim = pos_patch.shape[-1]
    if init == "randn":
        new = torch.randn(1, registers, dim, generator=g) / math.sqrt(dim)
    else:
        mean, spread = pos_patch.mean(1, keepdim=True), pos_patch.std()
        new = mean.expand(1, registers, dim) + noise * spread * torch.randn(1, registers, dim, generator=g)
    if student.reg_token is not None:
        sd["reg_token"] = new if old_reg is None else torch.cat([old_reg, new], 1)
    student.load_state_dict(sd)
    return student.eval()


def resolve_patterns(model: VisionTransformer, patterns: list[str]) -> list[str]:
    """`blocks.-1.*` -> `blocks.11.*`: negative block indices count from the end."""
    depth = len(model.blocks)
    return [re.sub(r"blocks\.(-\d+)", lambda m: f"blocks.{depth + int(m.group(1))}", p) for p in patterns]


def unlock(model: torch.nn.Module, groups: list[UnlockGroup], lr: float, weight_decay: float) -> list[dict]:
    """Freeze everything, unlock the parameters the groups name; return optimizer param groups."""
    model.requires_grad_(False)
    named = dict(model.named_parameters())
    taken: dict[str, int] = {}
    param_groups = []
    for gi, group in enumerate(groups):
        names = []
        for pattern in resolve_patterns(model, group.params):
            hits = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise UsageError(f"recipe key train.unlock[{gi}].params: {pattern!r} matches no parameter "
                                 f"(e.g. {', '.join(list(named)[:4])}, ...)")
            for n in hits:
                if n in taken and taken[n] != gi:
                    raise UsageError(f"recipe key train.unlock: {n} is matched by groups {taken[n]} and {gi}")
                taken[n] = gi
                if n not in names:
                    names.append(n)
        for n in names:
            named[n].requires_grad_(True)
        wd = weight_decay if group.weight_decay is None else group.weight_decay
        param_groups.append(dict(params=[named[n] for n in names], names=names, lr=lr * group.lr_scale,
                                 weight_decay=wd))
    return [g for g in param_groups if g["params"]]


def unlocked_table(model: torch.nn.Module, param_groups: list[dict]) -> str:
    total = sum(p.numel() for p in model.parameters())
    rows = [f"{'unlocked parameter':<40} {'shape':>18} {'count':>10} {'lr':>9}"]
    n_unlocked = 0
    for g in param_groups:
        for name, p in zip(g["names"], g["params"]):
            rows.append(f"{name:<40} {str(tuple(p.shape)):>18} {p.numel():>10,} {g['lr']:>9.2e}")
            n_unlocked += p.numel()
    rows.append(f"{'total unlocked':<40} {'':>18} {n_unlocked:>10,} of {total:,} ({100 * n_unlocked / total:.1f}%)")
    return "\n".join(rows)


def normalization(model: VisionTransformer, cfg: ModelCfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's own mean/std (timm's pretrained config) unless the recipe overrides them."""
    data_cfg = resolve_data_config({}, model=model)
    return tuple(cfg.mean or data_cfg["mean"]), tuple(cfg.std or data_cfg["std"])


def patch_tokens(model: VisionTransformer, x: torch.Tensor, tap: str = "final") -> torch.Tensor:
    """Patch tokens (B, L, D), prefix tokens (class, registers) dropped. `tap` picks where to read them."""
    if tap == "final":
        return model.forward_features(x)[:, model.num_prefix_tokens:]
    feats = model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True)[-1]
    return feats


class PatchTokens(torch.nn.Module):
    """A model whose forward() returns patch tokens, so DDP and autocast wrappers see the call."""

    def __init__(self, model: VisionTransformer, tap: str = "final"):
        super().__init__()
        self.model, self.tap = model, tap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_tokens(self.model, x, self.tap)


@dataclass
class Loaded:
    """A model resolved from a user's spec, with what evaluating it needs."""
    model: VisionTransformer
    name: str
    img_size: int
    mean: tuple
    std: tuple
    run: Path | None = None  # the phreg run it came from, if any


def run_recipe(run: Path):
    from .recipe import load_recipe

    return load_recipe(run / "recipe.yaml")


def load_spec(spec: str, img_size: int | None = None, checkpoint: str | None = None) -> Loaded:
    """Any model a user can name: timm name (+ checkpoint file), local-dir:/hf-hub:, an export folder, a run folder.

    Resolution defaults to the run's recipe, else the export's own input size, else 224.
    """
    path = Path(spec)
    run = None
    if path.is_dir() and (path / "recipe.yaml").is_file():
        run = path
        if not (path / "export" / "config.json").is_file():
            raise UsageError(f"{path} is a phreg run without a finished export (run it to the end, or `phreg export`)")
        img_size = img_size or run_recipe(path).model.img_size
        path = path / "export"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} is neither a phreg run nor a timm export folder (no config.json)")
        spec = f"local-dir:{path}"
        if img_size is None:
            img_size = json.loads((path / "config.json").read_text())["pretrained_cfg"]["input_size"][-1]
    elif ":" not in spec and not timm.is_model(spec):
        raise UsageError(f"model {spec}: no such folder, and not a timm model name")
    img_size = img_size or 224
    cfg = ModelCfg(name=spec, checkpoint=checkpoint, img_size=img_size)
    model = load_teacher(cfg)
    mean, std = normalization(model, cfg)
    return Loaded(model, str(run or spec), img_size, mean, std, run)


def load_run_teacher(run: Path, img_size: int | None = None) -> Loaded:
    """The base model a run was distilled from, with its weights, as its recipe names them."""
    m = run_recipe(run).model
    cfg = ModelCfg(name=m.name, checkpoint=m.checkpoint, img_size=img_size or m.img_size, mean=m.mean, std=m.std)
    model = load_teacher(cfg)
    mean, std = normalization(model, cfg)
    return Loaded(model, m.name, cfg.img_size, mean, std)
