"""How a pretrained model is built and loaded: a timm name (or a local-dir: / hf-hub: one) plus the weights that
`phreg.models.weights` found, into a frozen model at the recipe's resolution, without a transient second copy.

Every mistake a user can make here (a name timm does not know, a family phreg does not distill, a file that is not
weights or does not fit, no weights and no network) is one `UsageError` line; the checks that need no torch are
`phreg.preflight`'s, called from here too, so that each message is written once.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config

from ..backbones import backbone
from ..errors import UsageError
from ..preflight import check_img_size, check_model_name
from ..recipe import ModelCfg
from .weights import checkpoints_dir, find_weights, hub_cached, offline_reason, quiet_hub


def error_summary(e: BaseException) -> str:
    """An exception from timm / torch as one line: its type and the line that names the problem (a size mismatch,
    a missing key), cut to 300 characters."""
    text = str(e).strip().splitlines()
    detail = next((ln.strip() for ln in text if "size mismatch" in ln or "Missing key" in ln), text[0] if text else "")
    return f"{type(e).__name__}: {detail[:300]}"


def build_model(name: str, **kwargs) -> torch.nn.Module:
    """`timm.create_model`, with one line for a name, hub or file timm cannot build, and one line naming the supported
    families for a model that is not one of them."""
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as e:  # timm raises many types for unknown names, bad hubs, bad files
        raise UsageError(f"could not build model {name!r}: {error_summary(e)}") from None
    backbone(model, name)  # a supported family, or one line naming the ones that are
    return model


def unknown_model(name: str, what: str) -> UsageError:
    """`what 'vit_smal_patch14_dinov2' is not a timm model; closest: vit_small_patch14_dinov2, ...`."""
    base = name.split(".")[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else "; see timm.list_models('*vit*')"
    return UsageError(f"{what} {name!r} is not a timm model{hint}")


def frozen_dtype(speed) -> torch.dtype | None:
    """The dtype `speed.frozen_dtype` holds frozen weights in (None: as loaded, float32)."""
    return torch.bfloat16 if speed.frozen_dtype == "bf16" else None


def load_teacher(cfg: ModelCfg, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Build the pretrained model at the recipe's resolution (timm resamples `pos_embed`), frozen, in eval mode.
    `dtype` (`speed.frozen_dtype: bf16`): floating weights held in it, converted tensor by tensor as they are read."""
    name, size = cfg.name, cfg.img_size
    check_model_name(name, cfg.checkpoint)
    source = name.split(":", 1)[0] if ":" in name else ""
    if not source and not timm.is_model(name):
        raise unknown_model(name, "model.name")
    weights = find_weights(cfg)
    file = weights.file
    if weights.kind == "hub":
        file = hub_cached(weights.hub_id)  # already downloaded once: no network needed
    where = checkpoints_dir() / f"{name.split('.')[0]}.safetensors"
    hint = f"pass model.checkpoint=FILE or put the file at {where}"
    if source == "hf-hub" and hub_cached(name.removeprefix("hf-hub:"), ("config.json",)) is None:
        reason = offline_reason()
        if reason:
            raise UsageError(f"model.name {name}: not in the local Hub cache and {reason}")
    check_img_size(build_model(name, pretrained=False, device="meta"), size)  # architecture only: no memory
    if file is None and weights.kind in ("hub", "url"):
        reason = offline_reason(weights.url if weights.kind == "url" else None)
        if reason:
            raise UsageError(f"no weights for {name} ({reason}, nothing cached): {hint}")
    if file is not None:
        try:
            # the file wins over a local-dir:/hf-hub: name's own weights; a whole CLIP (`visual.*` + text tower) goes
            # through timm's OpenAI / open_clip key conversion (the family's checkpoint_filter_fn) like any checkpoint
            with quiet_hub():
                model = load_into_meta(name, file, dtype=dtype, img_size=size)
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"checkpoint {file} does not fit {name}: {error_summary(e)}") from None
    else:
        try:
            with quiet_hub():
                model = build_model(name, img_size=size, pretrained=True)
            for p in model.parameters() if dtype is not None else ():
                if p.ndim == 2:
                    p.data = p.data.to(dtype)
        except UsageError as e:
            raise UsageError(f"no weights for {name}: {hint} (download failed: {str(e).split(': ', 2)[-1]})") \
                from None
    model.eval().requires_grad_(False)
    return model


def load_into_meta(name: str, file: str | Path, dtype: torch.dtype | None = None, **kwargs) -> torch.nn.Module:
    """`name` with the weights in `file`, built without a transient copy of them.

    `timm.create_model(pretrained=True)` first fills the model with random weights and then copies a loaded state
    dict into them: two full copies at once. Here the model is built on the meta device (no memory), the file is read
    once by timm's own loader (safetensors, or `torch.load(weights_only=True)`), the family's `checkpoint_filter_fn`
    adapts it as timm would (DINOv2 original keys, `pos_embed` resampling to `img_size`, ...), and
    `load_state_dict(assign=True)` makes those tensors the model's own. A safetensors file is read tensor by tensor
    into the model's own storage (`phreg.tensorfile`: no memory map whose pages would count a second time), converted
    to `dtype` (bf16 frozen weights) one tensor at a time: the linear layers' weight matrices, which are >99% of a
    ViT's bytes; tokens, the patch conv, norms, biases and layer scales stay float32, as autocast wants them on
    every device (CPU autocast does not cast a LayerNorm's or a conv's parameters).
    """
    from ..tensorfile import load_file

    model = timm.create_model(name, pretrained=False, device="meta", **kwargs)
    try:
        if str(file).endswith(".safetensors"):
            state = timm.models.clean_state_dict(load_file(file, dtype=dtype, ndim=2))
        else:
            state = timm.models.load_state_dict(str(file))
    except Exception as e:  # safetensors and torch.load raise many types for a file that is not weights at all
        raise UsageError(f"{file} is not a weights file phreg can read (safetensors, or a PyTorch state dict in "
                         f".pth/.pt/.bin, read with weights_only=True): {error_summary(e)}") from None
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
        want = dtype if dtype is not None and value.ndim == 2 else expected.get(key, value).dtype
        if key in expected and value.is_floating_point() and value.dtype != want:
            state[key] = value.to(want)
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
