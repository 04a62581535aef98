"""Teacher-target cache: the teacher is frozen, so its denoised targets for a fixed (crop, view plan) never change.

With `cache.enabled`, each image gets K variants (crop + view plan drawn for key (seed, k, index)); their targets are
computed once into a memory-mapped float16 `.npy` of shape (K, N, L, D), and epoch e trains on variant e mod K.
The folder carries a key over everything the targets depend on; a folder with another key is rebuilt, a complete one is
reused (across `--resume` and across runs that point `cache.dir` at it).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .files import write_json
from .recipe import Recipe

ARRAY, META = "targets.npy", "meta.json"


def cache_key(recipe: Recipe, files: list[Path]) -> str:
    """Everything a target depends on: weights, resolution, views, crops, the files themselves."""
    m, v, d = recipe.model, recipe.views, recipe.data
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    parts = dict(name=m.name, checkpoint=m.checkpoint, img_size=m.img_size, mean=m.mean, std=m.std,
                 views={k: getattr(v, k) for k in ("num", "max_shift", "flip", "candidates", "fill", "tap")},
                 resize=d.resize, seed=recipe.seed, plans=recipe.cache.plans, dtype=recipe.cache.dtype, files=stats)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class TargetCache:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META).read_text())
        self.plans = self.meta["plans"]
        self._array = None  # opened lazily, once per data worker

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.folder / ARRAY, mmap_mode="r")
        return self._array

    def __getstate__(self):
        return dict(self.__dict__, _array=None)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        k, index = key
        return torch.from_numpy(np.array(self.array[k, index]))

    @classmethod
    def open_or_build(cls, folder: Path, key: str, dataset, denoiser, acc, plans: int, dtype: str = "float16",
                      batch_size: int = 8, quiet: bool = False) -> "TargetCache":
        """Reuse `folder` if it holds a complete cache with `key`, else compute it (sharded over processes)."""
        folder = Path(folder)
        meta = folder / META
        if meta.is_file() and json.loads(meta.read_text()).get("key") == key:
            return cls(folder)
        n = len(dataset)
        shape = (plans, n, denoiser.num_patches, denoiser.dim)
        dtype = np.dtype(dtype)
        tmp = folder / f".{ARRAY}.tmp"
        if acc.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            meta.unlink(missing_ok=True)
            np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()
        acc.wait_for_everyone()
        out = np.load(tmp, mmap_mode="r+")
        keys = [(k, i) for k in range(plans) for i in range(n)][acc.process_index::acc.num_processes]
        bar = tqdm(total=len(keys), disable=quiet or not acc.is_local_main_process, desc="teacher targets")
        for start in range(0, len(keys), batch_size):
            items = [dataset.item(*key) for key in keys[start:start + batch_size]]
            x = torch.stack([s["image"] for s in items]).to(acc.device)
            plan = torch.stack([s["plan"] for s in items]).to(acc.device)
            with acc.autocast():
                t = denoiser(x, plan).to("cpu", torch.float32).numpy()
            for (k, i), ti in zip(keys[start:start + batch_size], t):
                out[k, i] = ti
            bar.update(len(items))
        bar.close()
        out.flush()
        del out
        acc.wait_for_everyone()
        if acc.is_main_process:
            os.replace(tmp, folder / ARRAY)
            write_json(meta, dict(key=key, plans=plans, images=n, shape=list(shape), dtype=dtype.name,
                                  bytes_per_image_plan=int(np.prod(shape[2:])) * dtype.itemsize))
        acc.wait_for_everyone()
        return cls(folder)
