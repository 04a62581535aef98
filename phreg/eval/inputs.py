"""What `phreg eval` and `phreg inspect` read besides models, checked before any model loads: images, masks, depth
maps and the train/val split.

Torch-free: a mask with a class id outside `--num-classes`, a mask or depth map missing for an image or of another
size, or a split file that does not list an image is reported in a second, not after the models have run.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.scan import IMAGE_SUFFIXES, scan_images
from ..errors import UsageError

MASK_MODES = ("L", "P", "I", "I;16")
DEPTH_SUFFIXES = {".png", ".npy", ".tif", ".tiff"}
DEPTH_INT_MODES = ("I;16", "I;16B", "I;16L", "I")  # integer depth: units of 1 / depth_scale metres (NYUv2: mm)


def by_stem(files: list[Path], folder: str | Path, flag: str, what: str, suffixes=IMAGE_SUFFIXES) -> list[Path]:
    """The file in `folder` with each image's file stem (`what`: mask, depth map)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{flag} {folder} is not a folder")
    by = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in suffixes}
    missing = [f for f in files if f.stem not in by]
    if missing:
        raise UsageError(f"no {what} for {missing[0].name} in {folder} ({what}s need the image's file stem)"
                         + (f"; {len(missing) - 1} more images have none" if len(missing) > 1 else ""))
    return [by[f.stem] for f in files]


def mask_files(files: list[Path], masks_dir: str | Path) -> list[Path]:
    """The mask of each image: same file stem, in `masks_dir`."""
    return by_stem(files, masks_dir, "--masks", "mask")


def depth_files(files: list[Path], depth_dir: str | Path) -> list[Path]:
    """The depth map of each image: same file stem, in `depth_dir` (.png, .npy, .tif)."""
    return by_stem(files, depth_dir, "--depth", "depth map", DEPTH_SUFFIXES)


def _image_size(image: Path) -> tuple[int, int]:
    with Image.open(image) as img:
        return img.size


def read_mask(mask: Path, image: Path, num_classes: int, ignore_index: int | None,
              label_map: tuple[int, ...] | None = None) -> np.ndarray:
    """One single-channel integer mask of its image's size with ids in 0..num_classes-1 (or the ignore index), after
    `label_map` (a 256-entry table: mask value -> label) when given."""
    try:
        with Image.open(mask) as m:
            if m.mode not in MASK_MODES:
                raise UsageError(f"mask {mask.name} is {m.mode}; expected a single-channel integer PNG")
            size = m.size
            arr = np.array(m).astype(np.int64)
    except (OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"mask {mask} cannot be read ({type(e).__name__}: {e})") from None
    img = _image_size(image)
    if size != img:
        raise UsageError(f"mask {mask.name} is {size[0]}x{size[1]} but its image is {img[0]}x{img[1]}")
    if label_map is not None:
        if arr.min() < 0 or arr.max() >= len(label_map):
            raise UsageError(f"mask {mask.name} has values outside 0..{len(label_map) - 1}, which its dataset's "
                             f"label map covers")
        arr = np.asarray(label_map, dtype=np.int64)[arr]
    bad = ((arr >= num_classes) | (arr < 0)) & (arr != (ignore_index if ignore_index is not None else -1))
    if bad.any():
        ids = sorted(set(np.unique(arr[bad]).tolist()))
        hint = ""
        if ignore_index is None and len(ids) == 1 and ids[0] >= 0:
            hint = f"; if {ids[0]} marks unlabelled pixels pass --ignore-index {ids[0]}, else --num-classes {ids[0] + 1}"
        raise UsageError(f"mask {mask.name} has class ids outside 0..{num_classes - 1} "
                         f"(ignore index {ignore_index}): {ids[:5]}{hint}")
    return arr


def need_classes(num_classes: int | None) -> None:
    if num_classes is None:
        raise UsageError("--masks needs --num-classes (e.g. --num-classes 11 --ignore-index 11 for CamVid)")
    if num_classes < 1:
        raise UsageError("--num-classes must be >= 1")


def _spread(n: int, sample: int) -> range:
    return range(0, n, max(1, n // sample))


def check_masks(files: list[Path], masks: list[Path], num_classes: int | None, ignore_index: int | None,
                sample: int = 200, label_map: tuple[int, ...] | None = None) -> None:
    """Up to `sample` masks, spread evenly, decoded and their ids checked."""
    need_classes(num_classes)
    for i in _spread(len(files), sample):
        read_mask(masks[i], files[i], num_classes, ignore_index, label_map)


def read_depth(path: Path, scale: float = 1000.0) -> np.ndarray:
    """A depth map in metres, float32 (H, W); 0 = no measurement. Integer files (16-bit PNG, integer .npy) hold
    units of 1 / `scale` m (NYUv2: millimetres, scale 1000); float files (TIFF mode F, float .npy) hold metres."""
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
            integer = arr.dtype.kind in "iu"
        else:
            with Image.open(path) as img:
                if img.mode not in DEPTH_INT_MODES + ("F",):
                    raise UsageError(f"depth map {path.name} is {img.mode}; expected a 16-bit PNG (millimetres) or "
                                     "a float TIFF / .npy (metres)")
                integer = img.mode != "F"
                arr = np.array(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"depth map {path} cannot be read ({type(e).__name__}: {e})") from None
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):  # (1, H, W) or (H, W, 1)
        arr = arr[0] if arr.shape[0] == 1 else arr[..., 0]
    if arr.ndim != 2 or arr.dtype.kind not in "iuf":
        raise UsageError(f"depth map {path.name} is {arr.dtype} of shape {arr.shape}; expected one channel of numbers")
    depth = arr.astype(np.float32) / np.float32(scale) if integer else arr.astype(np.float32)
    return np.where(np.isfinite(depth) & (depth > 0), depth, np.float32(0))


def check_depth(files: list[Path], depth: list[Path], scale: float, sample: int = 200,
                size: tuple[int, int] | None = None) -> None:
    """Up to `sample` depth maps, spread evenly: readable, one channel, their image's size (and `size` (W, H) when
    given: a benchmark's fixed resolution)."""
    for i in _spread(len(files), sample):
        d = read_depth(depth[i], scale)
        img = _image_size(files[i])
        if (d.shape[1], d.shape[0]) != img or (size and img != size):
            want = f"{size[0]}x{size[1]}, the benchmark's" if size else f"{img[0]}x{img[1]}, its image's"
            raise UsageError(f"depth map {depth[i].name} is {d.shape[1]}x{d.shape[0]}; expected {want} size")


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


def check_limit(limit: int) -> None:
    if limit < 0:
        raise UsageError("--limit must be >= 0")


def check_images(folder: str, limit: int = 0) -> list[Path]:
    check_limit(limit)
    files, _ = scan_images(folder, "--images")
    return files[:limit] if limit else files


def check_views(views: int) -> int:
    if views < 1:
        raise UsageError("--views must be >= 1")
    return views
