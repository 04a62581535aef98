"""What `phreg eval` and `phreg inspect` read besides models, checked before any model loads: images, masks and
the train/val split.

Torch-free: a mask with a class id outside `--num-classes`, a mask missing for an image, or a split file that does not
list an image is reported in a second, not after the models have run.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.scan import IMAGE_SUFFIXES, scan_images
from ..errors import UsageError

MASK_MODES = ("L", "P", "I", "I;16")


def mask_files(files: list[Path], masks_dir: str | Path) -> list[Path]:
    """The mask of each image: same file stem, in `masks_dir`."""
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise UsageError(f"--masks {masks_dir} is not a folder")
    by_stem = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    missing = [f for f in files if f.stem not in by_stem]
    if missing:
        raise UsageError(f"no mask for {missing[0].name} in {masks_dir} (masks need the image's file stem)"
                         + (f"; {len(missing) - 1} more images have none" if len(missing) > 1 else ""))
    return [by_stem[f.stem] for f in files]


def read_mask(mask: Path, image: Path, num_classes: int, ignore_index: int | None) -> np.ndarray:
    """One single-channel integer mask of its image's size with ids in 0..num_classes-1 (or the ignore index)."""
    with Image.open(mask) as m, Image.open(image) as img:
        if m.mode not in MASK_MODES:
            raise UsageError(f"mask {mask.name} is {m.mode}; expected a single-channel integer PNG")
        if m.size != img.size:
            raise UsageError(f"mask {mask.name} is {m.size[0]}x{m.size[1]} but its image is "
                             f"{img.size[0]}x{img.size[1]}")
        arr = np.array(m).astype(np.int64)
    bad = ((arr >= num_classes) | (arr < 0)) & (arr != (ignore_index if ignore_index is not None else -1))
    if bad.any():
        ids = sorted(set(np.unique(arr[bad]).tolist()))
        hint = ""
        if ignore_index is None and len(ids) == 1 and ids[0] >= 0:
            hint = f"; if {ids[0]} marks unlabelled pixels pass --ignore-index {ids[0]}, else --num-classes {ids[0] + 1}"
        raise UsageError(f"mask {mask.name} has class ids outside 0..{num_classes - 1} "
                         f"(ignore index {ignore_index}): {ids[:5]}{hint}")
    return arr


def check_masks(files: list[Path], masks_dir: str | Path, num_classes: int | None, ignore_index: int | None,
                sample: int = 200) -> None:
    """Every image has a mask; up to `sample` masks, spread evenly, are decoded and their ids checked."""
    if num_classes is None:
        raise UsageError("--masks needs --num-classes (e.g. --num-classes 11 --ignore-index 11 for CamVid)")
    if num_classes < 1:
        raise UsageError("--num-classes must be >= 1")
    masks = mask_files(files, masks_dir)
    step = max(1, len(files) // sample)
    for mask, image in list(zip(masks, files))[::step]:
        read_mask(mask, image, num_classes, ignore_index)


def split_indices(files: list[Path], split_file: str | None) -> tuple[list[int], list[int]]:
    """train/val from a split file (CSV with file,split columns, or lines "name split"), else every 4th image to val."""
    if split_file is None:
        val = [i for i in range(len(files)) if i % 4 == 3]
        return [i for i in range(len(files)) if i % 4 != 3], val
    path = Path(split_file)
    if not path.is_file():
        raise UsageError(f"--split {path} not found")
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError) as e:
        raise UsageError(f"--split {path} is not a text file ({type(e).__name__})") from None
    if not text.strip():
        raise UsageError(f"--split {path} is empty")
    if "," in text.splitlines()[0]:
        rows = [(r.get("file") or r.get("name") or "", r.get("split") or "") for r in csv.DictReader(text.splitlines())]
    else:
        rows = [tuple(line.split()[:2]) for line in text.splitlines() if len(line.split()) >= 2]
    split = {Path(name).stem: s.strip().lower() for name, s in rows}
    missing = [f.name for f in files if f.stem not in split]
    if missing:
        raise UsageError(f"--split {path} does not list {missing[0]} (and {len(missing) - 1} more)")
    train = [i for i, f in enumerate(files) if split[f.stem] == "train"]
    val = [i for i, f in enumerate(files) if split[f.stem] in ("val", "test")]
    if not train or not val:
        raise UsageError(f"--split {path}: need both train and val images, got {len(train)} and {len(val)}")
    return train, val


def check_images(folder: str, limit: int = 0) -> list[Path]:
    if limit < 0:
        raise UsageError("--limit must be >= 0")
    files, _ = scan_images(folder, "--images")
    return files[:limit] if limit else files


def check_views(views: int) -> int:
    if views < 1:
        raise UsageError("--views must be >= 1")
    return views
