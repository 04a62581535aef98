"""Weight lookup: a pretrained timm model (any family in `phreg.backbones`) from a file, a hub or a run folder.

Weights are found, in order, at: `model.checkpoint` (a file), a `local-dir:` / `hf-hub:` model name, a file named after
the model in the checkpoints folder (`$PHREG_CHECKPOINTS`, default `./checkpoints`), or timm's own download.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import sys
import socket
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

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


def unknown_model(name: str, what: str) -> UsageError:
    """`what 'vit_smal_patch14_dinov2' is not a timm model; closest: vit_small_patch14_dinov2, ...`."""
    base = name.split(".")[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else "; see timm.list_models('*vit*')"
    return UsageError(f"{what} {name!r} is not a timm model{hint}")


HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def hub_cached(repo_id: str, files=HUB_FILES) -> Path | None:
    """A file of `repo_id` already in the huggingface_hub cache (no network), or None."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo_id.partition("@")
    for name in files:
        found = try_to_load_from_cache(repo_id, name, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


def offline_reason(url: str | None = None, timeout: float = 3.0) -> str | None:
    """Why nothing can be downloaded right now (HF_HUB_OFFLINE, or the host does not answer), else None.

    One TCP connect with a short timeout, run in a thread so that a hanging DNS lookup cannot outlast it either:
    a machine without internet answers in seconds instead of after the hub client's retries.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    where = urlparse(url or constants.ENDPOINT)
    host, port = where.hostname, where.port or (443 if where.scheme == "https" else 80)
    if not host:
        return None
    pool = ThreadPoolExecutor(1)
    try:
        pool.submit(lambda: socket.create_connection((host, port), timeout=timeout).close()).result(timeout + 0.5)
    except Exception:  # gaierror, refused, timed out
        return f"cannot reach {host}"
    finally:
        pool.shutdown(wait=False)
    return None


@contextlib.contextmanager
def quiet_hub():
    """No retry chatter from huggingface_hub / timm / urllib3 on the console while weights are fetched."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "timm", "urllib3", "httpx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Weights:
    """Where a model's pretrained weights come from, decided before anything is built or downloaded.

    kind: "file" (model.checkpoint or checkpoints/NAME.ext), "hub" (timm's Hub copy: hub_id), "spec" (a local-dir: /
    hf-hub: name), "url" (timm's non-Hub download)."""
    kind: str
    file: Path | None = None
    hub_id: str | None = None
    url: str | None = None

    def record(self, name: str) -> dict:
        """What the model card needs to say where the weights came from: file name + sha256, or hub id + revision."""
        if self.kind == "file":
            return dict(source="file", file=self.file.name, sha256=sha256_file(self.file), bytes=self.file.stat().st_size)
        spec = name if self.kind == "spec" else None
        if spec and spec.startswith("local-dir:"):
            folder = Path(spec.removeprefix("local-dir:"))
            weights = next((folder / n for n in HUB_FILES if (folder / n).is_file()), None)
            return dict(source="local-dir", file=str(folder), sha256=sha256_file(weights) if weights else None)
        hub_id = self.hub_id or (spec.removeprefix("hf-hub:") if spec else None)
        if hub_id:
            cached = hub_cached(hub_id)
            # the cache keeps files under snapshots/<commit sha>/<file>: that commit is the revision that was loaded
            revision = cached.parent.name if cached is not None and cached.parent.parent.name == "snapshots" else None
            return dict(source="hub", hub_id=hub_id.split("@")[0], revision=revision,
                        file=cached.name if cached else None)
        return dict(source="url", url=self.url)


def find_weights(cfg: ModelCfg) -> Weights:
    """The lookup order of the module docstring, without touching the network."""
    name = cfg.name
    if cfg.checkpoint:
        return Weights("file", file=Path(cfg.checkpoint))
    if ":" in name:
        return Weights("spec")
    local = find_local_weights(name)
    if local is not None:
        return Weights("file", file=local)
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(name)
    hub_id = getattr(pcfg, "hf_hub_id", None) if pcfg else None
    return Weights("hub", hub_id=hub_id) if hub_id else Weights("url", url=getattr(pcfg, "url", None) or None)


def load_teacher(cfg: ModelCfg) -> torch.nn.Module:
    """Build the pretrained model at the recipe's resolution (timm resamples `pos_embed`), frozen, in eval mode."""
    name, size = cfg.name, cfg.img_size
    source = name.split(":", 1)[0] if ":" in name else ""
    if source and source not in ("local-dir", "hf-hub"):
        raise UsageError(f"model.name {name!r}: only the prefixes local-dir: and hf-hub: are understood")
    if cfg.checkpoint and not Path(cfg.checkpoint).is_file():
        raise UsageError(f"model.checkpoint {cfg.checkpoint} not found")
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
    check_img_size(_create(name, pretrained=False, device="meta"), size)  # architecture only: no weights, no memory
    if file is None and weights.kind in ("hub", "url"):
        reason = offline_reason(weights.url if weights.kind == "url" else None)
        if reason:
            raise UsageError(f"no weights for {name} ({reason}, nothing cached): {hint}")
    if file is not None:
        try:
            # the file wins over a local-dir:/hf-hub: name's own weights; a whole CLIP (`visual.*` + text tower) goes
            # through timm's OpenAI / open_clip key conversion (the family's checkpoint_filter_fn) like any checkpoint
            with quiet_hub():
                model = load_into_meta(name, file, img_size=size)
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"checkpoint {file} does not fit {name}: {_first_line(e)}") from None
    else:
        try:
            with quiet_hub():
                model = _create(name, img_size=size, pretrained=True)
        except UsageError as e:
            raise UsageError(f"no weights for {name}: {hint} (download failed: {str(e).split(': ', 2)[-1]})") \
                from None
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
    try:
        state = timm.models.load_state_dict(str(file))
    except Exception as e:  # safetensors and torch.load raise many types for a file that is not weights at all
        raise UsageError(f"{file} is not a weights file phreg can read (safetensors, or a PyTorch state dict in "
                         f".pth/.pt/.bin, read with weights_only=True): {_first_line(e)}") from None
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
        if os.sep in spec or spec.startswith("."):
            raise UsageError(f"model {spec}: no such folder")
        raise unknown_model(spec, "model")
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
