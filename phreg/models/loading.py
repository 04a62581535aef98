"""How a pretrained model is built and loaded: a timm name (or a local-dir: / hf-hub: one) plus the weights that
`phreg.models.weights` found, into a frozen model at the recipe's resolution, without a transient second copy.

Every mistake a user can make here (a name timm does not know, a family phreg does not distill, a file that is not
weights or does not fit, no weights and no network) is one `UsageError` line; the checks that need no torch are
`phreg.models.names`', called from here too, so that each message is written once.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config

from ..backbones import backbone
from ..config.recipe import ModelCfg
from ..errors import UsageError
from .names import check_img_size, check_model_name, timm_name, unknown_model
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


def frozen_dtype(speed) -> torch.dtype | None:
    """The dtype `speed.frozen_dtype` holds frozen weights in (None: as loaded, float32)."""
    return torch.bfloat16 if speed.frozen_dtype == "bf16" else None


def load_teacher(cfg: ModelCfg, dtype: torch.dtype | None = None, views=None) -> torch.nn.Module:
    """Build the pretrained model at the recipe's resolution (timm resamples `pos_embed`), frozen, in eval mode.
    `dtype` (`speed.frozen_dtype: bf16`): floating weights held in it, converted tensor by tensor as they are read.
    `views` (the recipe's, when the model is a teacher): checked against the patch grid before any weight is read."""
    if cfg.name != (name := timm_name(cfg.name)):  # an alias, from a caller without the CLI
        cfg = dataclasses.replace(cfg, name=name)
    size = cfg.img_size
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
    check_img_size(build_model(name, pretrained=False, device="meta"), size, views)  # architecture only: no memory
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


WEIGHTS_EXPECTED = ("expected a .safetensors file or a PyTorch state dict (.pth/.pt/.bin: tensors only, read with "
                    "weights_only=True)")


def sniff(file: str | Path) -> str:
    """What a file is, from its first bytes: 'safetensors', 'zip' (a torch.save archive), 'other zip', 'pickle'
    (torch's legacy format), 'text' or 'binary'. Decides which words a load failure gets; nothing is unpickled."""
    with open(file, "rb") as f:
        head = f.read(4096)
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 2 <= n < 100 << 20 and head[8:9] == b"{":
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        import zipfile

        try:
            with zipfile.ZipFile(file) as z:
                return "zip" if any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist()) else "other zip"
        except zipfile.BadZipFile:
            return "binary"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    try:
        head.decode("utf-8")
        return "text" if head and b"\x00" not in head else "binary"
    except UnicodeDecodeError:
        return "binary"


def not_weights(file: str | Path) -> str:
    """Why `file` did not load as weights, in words that fit what the file is (never torch's `weights_only=False`
    advice: phreg has no such switch and never unpickles)."""
    kind = sniff(file)
    if kind == "safetensors":
        return f"{file} is a damaged safetensors file (its header or tensors do not read); download or copy it again"
    if kind in ("zip", "pickle"):
        what = "a torch.save archive" if kind == "zip" else "a legacy torch.save (pickle) file"
        return (f"{file} is {what} that holds more than tensors (a whole model or training state, which phreg never "
                f"unpickles); save its state dict instead: torch.save(model.state_dict(), FILE) or safetensors")
    if kind == "other zip":
        return f"{file} is a zip archive but not a torch.save archive (no data.pkl in it); {WEIGHTS_EXPECTED}"
    if kind == "text":
        with open(file, "rb") as f:
            first = f.read(200).decode("utf-8", "replace").splitlines()
        line = first[0][:60] if first else ""
        return (f"{file} is a text file, not weights (it starts {line!r}); {WEIGHTS_EXPECTED}")
    return f"{file} is neither safetensors nor a PyTorch archive ({Path(file).stat().st_size} bytes of other data); " \
           f"{WEIGHTS_EXPECTED}"


def load_into_meta(name: str, file: str | Path, dtype: torch.dtype | None = None, **kwargs) -> torch.nn.Module:
    """`name` with the weights in `file`, built without a transient copy of them.

    `timm.create_model(pretrained=True)` first fills the model with random weights and then copies a loaded state
    dict into them: two full copies at once. Here the model is built on the meta device (no memory), the file is read
    once by timm's own loader (safetensors, or `torch.load(weights_only=True)`), the family's `checkpoint_filter_fn`
    adapts it as timm would (DINOv2 original keys, `pos_embed` resampling to `img_size`, ...), and
    `load_state_dict(assign=True)` makes those tensors the model's own. A safetensors file is read tensor by tensor
    into the model's own storage (`phreg.files.tensorfile`: no memory map whose pages would count a second time), converted
    to `dtype` (bf16 frozen weights) one tensor at a time: the linear layers' weight matrices, which are >99% of a
    ViT's bytes; tokens, the patch conv, norms, biases and layer scales stay float32, as autocast wants them on
    every device (CPU autocast does not cast a LayerNorm's or a conv's parameters).
    """
    from ..files.tensorfile import load_file

    model = timm.create_model(name, pretrained=False, device="meta", **kwargs)
    try:
        if str(file).endswith(".safetensors"):
            state = timm.models.clean_state_dict(load_file(file, dtype=dtype, ndim=2))
        else:
            state = timm.models.load_state_dict(str(file))
    except Exception:  # safetensors and torch.load raise many types for a file that is not weights at all
        raise UsageError(not_weights(file)) from None
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
