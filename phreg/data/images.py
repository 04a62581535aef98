"""Images: a folder of photos in whatever format people have, turned into square uint8 crops.

Crops travel as uint8 (a quarter of float32's bytes) from the data workers to the device, which normalizes them
(`Normalize`): the workers only decode and crop.

Every random choice for a sample (its crop, its view plan) is drawn from `numpy.random.default_rng([seed, epoch,
index])`, so a sample is a pure function of those three numbers: the same in any worker, on any number of processes,
and after `--resume`.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler, get_worker_info

from ..errors import UsageError

log = logging.getLogger("phreg")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode any common mode to 8-bit RGB: grayscale, palette, alpha (over white), CMYK, 16-bit; EXIF rotation.
    `path` may also be an image held by a dataset (`phreg.data.sources`): anything with `read_bytes()` but a file name."""
    with Image.open(path if isinstance(path, (str, Path)) else io.BytesIO(path.read_bytes())) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            arr = np.asarray(img, dtype=np.float32)
            top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
            if img.mode == "F":
                top = max(float(arr.max()), 1.0)
            img = Image.fromarray(np.clip(arr / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, rgba)
        return img.convert("RGB")


def resize_short(img: Image.Image, short: int) -> Image.Image:
    w, h = img.size
    s = short / min(w, h)
    return img.resize((max(short, round(w * s)), max(short, round(h * s))), Image.BICUBIC)


class Normalize(torch.nn.Module):
    """uint8 pixels (B, 3, H, W), any memory layout -> the model's normalized float32 input, contiguous, on the
    pixels' device: (x / 255 - mean) / std, channel by channel."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.mean.device, non_blocking=True).to(torch.float32, memory_format=torch.contiguous_format)
        return (x / 255 - self.mean) / self.std


class ImageDataset(Dataset):
    """Keys are (epoch, index). Train: resize the short side, random square crop. Eval: center crop.

    A sample is dict(pixels = uint8 (3, S, S), plan (V, 3) or empty, index, bad = paths that failed to decode and were
    replaced by the next usable image so that batch shapes never change). With a target cache of K plans, epoch e
    draws variant e mod K, and a whole batch is read at once (`__getitems__`) with its cached `target`.
    `images(keys)` gives normalized float crops for scoring and inspection.
    """

    def __init__(self, files: list[Path], img_size: int, mean, std, seed: int = 0, resize: int = 0,
                 train: bool = True, make_plan: Callable[..., torch.Tensor] | None = None):
        self.files, self.size, self.resize, self.seed, self.train = files, img_size, resize or img_size, seed, train
        self.normalize = Normalize(mean, std)
        self.make_plan = make_plan
        self.cache = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return self.item(epoch, index)

    def __getitems__(self, keys: list) -> dict:
        """A whole batch (what the DataLoader asks a worker for): decoded image by image, or, from the target cache,
        read with one gather per array straight into the batch's memory (shared memory in a data worker, so it
        reaches the training process without another copy)."""
        if self.cache is None:
            return collate([self[key] for key in keys])
        return self.cache.batch([key if isinstance(key, tuple) else (0, key) for key in keys],
                                shared=get_worker_info() is not None)

    def images(self, keys=None) -> torch.Tensor:
        """Normalized float crops (N, 3, S, S) of `keys` (default: every image, epoch 0)."""
        keys = range(len(self)) if keys is None else keys
        return self.normalize(collate([self[key] for key in keys])["pixels"])

    def item(self, epoch: int, index: int) -> dict:
        bad = []
        for k in range(len(self.files)):
            i = (index + k) % len(self.files)
            try:
                img = resize_short(load_rgb(self.files[i]), self.resize)
                break
            except Exception as e:
                log.debug("skipping %s: %s", self.files[i], e)
                bad.append(str(self.files[i]))
        else:
            raise UsageError(f"none of the {len(self.files)} images could be decoded")
        rng = np.random.default_rng([self.seed, epoch, index])
        w, h = img.size
        if self.train:
            x0, y0 = int(rng.integers(0, w - self.size + 1)), int(rng.integers(0, h - self.size + 1))
        else:
            x0, y0 = (w - self.size) // 2, (h - self.size) // 2
        crop = torch.from_numpy(np.array(img.crop((x0, y0, x0 + self.size, y0 + self.size))))  # (S, S, 3) uint8
        plan = self.make_plan(rng=rng) if self.make_plan else torch.zeros(0, 3, dtype=torch.long)
        return dict(pixels=crop.permute(2, 0, 1), plan=plan, index=index, bad=bad)


def collate(samples: list[dict] | dict) -> dict:
    """Samples -> a batch: pixels (B, 3, S, S) uint8, plans (B, V, 3), indices, every replaced file. A batch that was
    read whole (`ImageDataset.__getitems__`) passes as it is."""
    if isinstance(samples, dict):
        return samples
    pixels = torch.stack([s["pixels"].permute(1, 2, 0) for s in samples]).permute(0, 3, 1, 2)  # one (B, S, S, 3) copy
    return dict(pixels=pixels, plan=torch.stack([s["plan"] for s in samples]),
                index=torch.tensor([s["index"] for s in samples]), bad=[p for s in samples for p in s["bad"]])


class EpochSampler(Sampler):
    """Yields (epoch, index) keys; shuffled by (seed, epoch) so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.random.default_rng([self.seed, self.epoch, 2**31]).permutation(self.n) if self.shuffle \
            else np.arange(self.n)
        return iter([(self.epoch, int(i)) for i in order])
