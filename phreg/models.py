"""Weight lookup: a pretrained timm model (any family in `phreg.backbones`) from a file, a hub or a run folder.

Weights are found, in order, at: `model.checkpoint` (a file), a `local-dir:` / `hf-hub:` model name, a file named after
the model in the checkpoints folder (`$PHREG_CHECKPOINTS`, default `./checkpoints`), or timm's own download.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config

from .backbones import backbone
from .errors import UsageError
from .recipe import ModelCfg

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


def _create(name: str, **kwargs) -> torch.nn.Module:
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as e:  # timm raises many types for unknown names, bad hubs, bad files
        raise UsageError(f"could not build model {name!r}: {_first_line(e)}") from None
    backbone(model, name)  # a supported family, or one line naming the ones that are
    return model


def check_img_size(model: torch.nn.Module, img_size: int) -> None:
    p = model.patch_embed.patch_size[0]
    if img_size % p:
        lo, hi = (img_size // p) * p, (img_size // p + 1) * p
        raise UsageError(f"model.img_size={img_size} is not a multiple of the patch size {p}; "
                         f"nearest valid sizes: {', '.join(str(s) for s in (lo, hi) if s > 0)}")


def load_teacher(cfg: ModelCfg) -> torch.nn.Module:
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
            # the file wins over a local-dir:/hf-hub: name's own weights; a whole CLIP (`visual.*` + text tower) goes
            # through timm's OpenAI / open_clip key conversion (the family's checkpoint_filter_fn) like any checkpoint
            model = load_into_meta(name, file, img_size=size)
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


def load_into_meta(name: str, file: str | Path, **kwargs) -> torch.nn.Module:
    """`name` with the weights in `file`, built without a transient copy of them.

    `timm.create_model(pretrained=True)` first fills the model with random weights and then copies a loaded state
    dict into them: two full copies at once. Here the model is built on the meta device (no memory), the file is read
    once by timm's own loader (safetensors, or `torch.load(weights_only=True)`), the family's `checkpoint_filter_fn`
    adapts it as timm would (DINOv2 original keys, `pos_embed` resampling to `img_size`, ...), and
    `load_state_dict(assign=True)` makes those tensors the model's own.
    """
    model = timm.create_model(name, pretrained=False, device="meta", **kwargs)
    state = timm.models.load_state_dict(str(file))
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    expected = model.state_dict()
    cfg = model.pretrained_cfg
    classifiers = cfg.get("classifier") or ()
    for head in (classifiers,) if isinstance(classifiers, str) else classifiers:  # a head the model does not have
        for key in (f"{head}.weight", f"{head}.bias"):
            if key in state and (key not in expected or state[key].shape != expected[key].shape):
                state.pop(key)
    for key, value in state.items():  # a half-precision file still gives a float32 model, as timm's copy would
        if key in expected and value.is_floating_point() and value.dtype != expected[key].dtype:
            state[key] = value.to(expected[key].dtype)
    model.load_state_dict(state, strict=True, assign=True)
    _init_meta_buffers(model)
    return model


def _init_meta_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (RoPE tables, ...) are not in a checkpoint: computed again as timm builds them."""
    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        for n in meta:
            module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
        if meta and not hasattr(module, "init_non_persistent_buffers"):
            raise RuntimeError(f"{type(module).__name__} has buffers {meta} that no checkpoint holds")
        if meta:
            module.init_non_persistent_buffers()


def normalization(model: torch.nn.Module, cfg: ModelCfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's own mean/std (timm's pretrained config) unless the recipe overrides them."""
    data_cfg = resolve_data_config({}, model=model)
    return tuple(cfg.mean or data_cfg["mean"]), tuple(cfg.std or data_cfg["std"])


@dataclass
class Loaded:
    """A model resolved from a user's spec, with what evaluating it needs."""
    model: torch.nn.Module
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
