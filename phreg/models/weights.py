"""Where a model's pretrained weights come from, decided before anything is built or downloaded.

In order: `model.checkpoint` (a file), a `local-dir:` / `hf-hub:` model name, a file named after the model in the
checkpoints folder (`$PHREG_CHECKPOINTS`, default `./checkpoints`), or timm's own download (its Hub copy, else its
URL). Also here: what is already in the huggingface_hub cache, why nothing can be downloaded right now (a probe that
answers in seconds on a machine without internet), and the file hashes a model card records.

No torch here, and timm only to read a name's pretrained config: finding weights never builds a model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..config.recipe import ModelCfg
from ..files.atomic import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")
HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


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


@dataclass
class Weights:
    """Where a model's pretrained weights come from, decided before anything is built or downloaded.

    kind: "file" (model.checkpoint or checkpoints/NAME.ext), "hub" (timm's Hub copy: hub_id), "spec" (a local-dir: /
    hf-hub: name), "url" (timm's non-Hub download)."""
    kind: str
    file: Path | None = None
    hub_id: str | None = None
    url: str | None = None

    def local(self, name: str) -> bool:
        """Weights from a file or a local-dir: folder, not the checkpoint timm's pretrained config describes: its tag
        and license are then not this model's to claim (the export's config.json drops them)."""
        return self.kind == "file" or (self.kind == "spec" and name.startswith("local-dir:"))

    def record(self, name: str) -> dict:
        """What the model card needs to say where the weights came from: file name + sha256, or hub id + revision."""
        if self.kind == "file":
            return dict(source="file", file=self.file.name, sha256=sha256_file(self.file),
                        bytes=self.file.stat().st_size)
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

    def identity(self, name: str, recorded: dict | None = None) -> dict:
        """`record` plus the file's mtime: what a checkpoint keeps of the frozen base weights it was trained on.

        The sha256 is computed once per run: a later check of a file with the size and mtime `recorded` says takes
        the recorded hash (a few seconds saved per GB on every --resume); a file touched since is hashed again."""
        if self.kind == "file" and self.file.is_file():
            st = self.file.stat()
            if recorded and recorded.get("bytes") == st.st_size and recorded.get("mtime_ns") == st.st_mtime_ns \
                    and recorded.get("sha256"):
                return dict(recorded, file=self.file.name)
            return dict(self.record(name), mtime_ns=st.st_mtime_ns)
        return self.record(name)


IDENTITY_KEYS = ("source", "sha256", "bytes", "hub_id", "revision", "url")


def base_change(recorded: dict, now: dict) -> str | None:
    """How the base weights `now` differ from the ones `recorded` (an identity from `Weights.identity`), or None."""
    for key in IDENTITY_KEYS:
        if recorded.get(key) != now.get(key) and not (key == "revision" and None in (recorded.get(key), now.get(key))):
            short = lambda v: v[:12] + "..." if isinstance(v, str) and len(v) > 16 else v  # noqa: E731
            return f"{key} was {short(recorded.get(key))}, is {short(now.get(key))}"
    return None


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
