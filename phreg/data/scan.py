"""Image folders: which files under a folder are photos to learn from. Torch-free, so every command can check its
folders before it loads a model.

Only headers are read (PIL opens a file without decoding it). Single-channel images with few distinct values next to
RGB photos are label masks (a dataset root holds both: `images/` and `masks/`); they are skipped, and one line
says how many.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from PIL import Image

from ..errors import UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
LABEL_MODES = ("L", "P", "I", "I;16")  # what label masks are stored as
LABEL_MAX_VALUES = 64  # a photo in grey levels has hundreds; a mask has one value per class it shows
log = logging.getLogger("phreg")
_warned: set[tuple[str, int]] = set()


def kind(root: str | Path | None) -> str:
    """'folder', 'hf' or 'wds' for a `data.root` value (see `phreg.data.sources`)."""
    if root is None:
        return "folder"
    text = str(root)
    if text.startswith("wds/") or re.search(r"\.tar(\.gz)?(\}|$|\s|::)", text) or text.endswith((".tar", ".tgz")):
        return "wds"
    if text.startswith("hfds/"):
        return "hf"
    path = Path(text)
    saved = any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))  # `save_to_disk`
    tables = any(path.glob("*.parquet")) or any(path.glob("data/*.parquet")) or any(path.glob("*.arrow"))
    return "hf" if path.is_dir() and (saved or tables) else "folder"


def embedded_photos() -> Path:
    """The public-domain / CC0 photos shipped with phreg: the quickstart's default data."""
    return Path(str(resources.files("phreg") / "photos"))


def _header(path: Path) -> str | None:
    """The image mode from the header (nothing decoded), or None when the file is not a readable image."""
    try:
        with Image.open(path) as img:
            return img.mode if img.size[0] > 0 and img.size[1] > 0 else None
    except Exception:
        return None


def _few_values(path: Path) -> bool:
    """Does this single-channel image hold at most LABEL_MAX_VALUES distinct values (a label mask)?"""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                img = img.convert("I")
            colors = img.getcolors(maxcolors=LABEL_MAX_VALUES)  # None as soon as there are more
            return colors is not None
    except Exception:
        return False


def scan_images(root: str | Path | None, key: str = "") -> tuple[list[Path], list[Path]]:
    """All image files under `root` (recursive, sorted): (usable, unreadable). `None` means the embedded photos.

    `key` names where the folder came from (`data.root`, `--images`) in every message. Label masks next to photos
    are left out with one warning line; a folder of nothing but masks is refused.
    """
    root = embedded_photos() if root is None else Path(os.path.expanduser(str(root)))
    key = f"{key}: " if key else ""
    if root.is_file():
        name = key.removesuffix(": ")
        wants = f"{name} is a folder of images" + (" (or a Hugging Face dataset, or WebDataset shards)"
                                                   if name.startswith("data.") else "")
        raise UsageError(f"{key}{root} is a file; {wants}" if name else f"{root} is a file, not a folder of images")
    if not root.is_dir():
        raise UsageError(f"{key}image folder {root} not found")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(f"{key}no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    with ThreadPoolExecutor(8) as pool:
        modes = list(pool.map(_header, files))
        single = [f for f, m in zip(files, modes) if m in LABEL_MODES]
        labels = {f for f, few in zip(single, pool.map(_few_values, single)) if few} if single else set()
    usable = [f for f, m in zip(files, modes) if m is not None and f not in labels]
    bad = [f for f, m in zip(files, modes) if m is None]
    if labels and not usable:
        raise UsageError(f"{key}all {len(labels)} images under {root} are single-channel label masks "
                         f"(e.g. {sorted(labels)[0].relative_to(root)}); point it at the photos")
    if not usable:
        raise UsageError(f"{key}no usable image under {root}: all {len(files)} image files are unreadable")
    if labels and (str(root), len(labels)) not in _warned:  # the CLI's check and the command scan the same folder
        _warned.add((str(root), len(labels)))
        where = sorted({str(f.parent.relative_to(root)) for f in labels})
        log.warning(f"{key}skipped {len(labels)} single-channel label masks under {root} (in "
                    f"{', '.join(where[:3])}{', ...' if len(where) > 3 else ''}); using {len(usable)} photos")
    return usable, bad


def file_list_hash(files: list[Path], root: Path | None) -> str:
    """sha256 over (path relative to root, size) of every file: names the exact training set without reading it."""
    h = hashlib.sha256()
    for f in files:
        rel = f.relative_to(root) if root is not None and f.is_relative_to(root) else f.name
        h.update(f"{rel}\t{f.stat().st_size}\n".encode())
    return h.hexdigest()


def data_record(d, files: list[Path], val_files: list[Path]) -> dict:
    """What a student was trained and scored on, as the model card states it: folder (or the embedded photos by
    name), image count, a hash of the file list; the held-out images, where they came from and how many were scored.
    `d` is the recipe's `data` section."""
    if kind(d.root) != "folder":  # a Hugging Face dataset or WebDataset shards: named, counted where it is cheap
        n = len(files) if kind(d.root) == "hf" else None
        split = f"data.val_split={d.val_split:g}" if d.val_split > 0 and len(val_files) else None
        streamed = kind(d.root) == "wds" and split and not d.val_root  # held out by key: named as the card says
        return dict(train=dict(dataset=str(d.root), kind=kind(d.root), images=n, embedded=False),
                    heldout=dict(images=len(val_files) if hasattr(val_files, "__len__") else None,
                                 folder=d.val_root, source="data.val_root" if d.val_root else split,
                                 names=[str(r) for r in val_files] if streamed else None))
    root = Path(d.root) if d.root else embedded_photos()
    train = dict(folder=str(root) if d.root else None, embedded=d.root is None, images=len(files),
                 names=[f.name for f in files] if d.root is None else None,
                 file_list_sha256=file_list_hash(files, root))
    n_val = min(len(val_files), d.val_limit) if d.val_limit else len(val_files)
    source = "data.val_root" if d.val_root else (f"data.val_split={d.val_split:g}" if val_files else None)
    heldout = dict(images=n_val, folder=d.val_root, source=source,
                   names=[f.name for f in val_files[:n_val]] if d.root is None and not d.val_root else None)
    return dict(train=train, heldout=heldout)
