"""Teacher-target cache: the teacher is frozen, so its denoised targets for a fixed (crop, view plan) never change.

With `cache.enabled`, each image gets K variants (crop + view plan drawn for key (seed, k, index)); their targets are
computed once into a memory-mapped float16 `.npy` of shape (K, N, L, D), next to the uint8 crops and plans, and epoch
e trains on variant e mod K without decoding a single image. Normalizing the stored uint8 crop gives exactly the
tensor the uncached path computes.
The folder carries a key over everything the targets depend on; a folder with another key is rebuilt, a complete one is
reused (across `--resume` and across runs that point `cache.dir` at it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..errors import UsageError
from ..files import write_json, writing
from ..recipe import Recipe
from ..sources import fingerprint

ARRAY, CROPS, PLANS, META = "targets.npy", "crops.npy", "plans.npy", "meta.json"


def cache_key(recipe: Recipe, files: list[Path], teacher_precision: str = "fp32", weights: Path | None = None) -> str:
    """Everything a target depends on: the weights (path, size, mtime), the teacher's precision (bf16 targets are
    not fp32 targets), resolution, views, crops, the image files themselves."""
    m, v, d = recipe.model, recipe.views, recipe.data
    stats = fingerprint(files)
    parts = dict(format=3, name=m.name, checkpoint=m.checkpoint, img_size=m.img_size, mean=m.mean, std=m.std,
                 weights=fingerprint([weights]) if weights else None, teacher_precision=teacher_precision,
                 views={k: getattr(v, k) for k in ("num", "max_shift", "flip", "candidates", "fill")},
                 head=m.teacher_head, sigma=m.naclip_sigma if m.teacher_head == "naclip" else None,
                 resize=d.resize, seed=recipe.seed, plans=recipe.cache.plans, dtype=recipe.cache.dtype, files=stats)
    if m.teacher_ttr != "none":  # only then, so caches built before the key existed stay valid
        side = Path(m.teacher_ttr).expanduser()
        side = side / "test_time_registers.json" if side.is_dir() else side
        parts["teacher_ttr"] = m.teacher_ttr if m.teacher_ttr == "find" else fingerprint([side])
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def arrays(images: int, plans: int, tokens: int, dim: int, dtype: str = "float16", img_size: int = 0,
           views: int = 0) -> dict[str, tuple[np.dtype, tuple]]:
    """The cache's arrays (file name -> dtype, shape): the targets, the uint8 crops they were computed on, the view
    plans. One description for building the cache and for every size it reports."""
    return {ARRAY: (np.dtype(dtype), (plans, images, tokens, dim)),
            CROPS: (np.dtype(np.uint8), (plans, images, img_size, img_size, 3)),
            PLANS: (np.dtype(np.int16), (plans, images, views, 3))}


def cache_bytes(images: int, plans: int, tokens: int, dim: int, dtype: str = "float16", img_size: int = 0,
                views: int = 0) -> int:
    """Bytes a target cache takes on disk: images x plans x (tokens x dim targets + the uint8 crop + the plan).

    Public so that whole-run disk estimates can add it up with the rest."""
    return sum(int(np.prod(shape)) * dt.itemsize
               for dt, shape in arrays(images, plans, tokens, dim, dtype, img_size, views).values())


def free_bytes(folder: Path) -> int:
    """Free space on the file system that would hold `folder` (its nearest existing ancestor)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_fits(folder: Path, size: int, images: int, plans: int, tokens: int, dim: int, dtype: str) -> str:
    """The size line printed before building; `UsageError` (one line) when the disk clearly cannot hold it."""
    what = (f"target cache: {images} images x {plans} plans x {tokens} tokens x {dim} dim x {dtype} "
            f"(+ crops and plans) = {size / 1e9:.2f} GB in {folder}")
    free = free_bytes(folder)
    if size > free:
        raise UsageError(f"{what}, but only {free / 1e9:.2f} GB are free there; set cache.dir to a larger disk, "
                         f"lower cache.plans, use cache.dtype=float16, or cache.enabled=false")
    return what


class TargetCache:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META).read_text())
        self.plans = self.meta["plans"]
        self._arrays = None  # memory maps, opened lazily once per data worker

    def __getstate__(self):
        return dict(self.__dict__, _arrays=None)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        """(target (L, D), uint8 crop (S, S, 3), plan (V, 3)) of variant k of image `index`."""
        if self._arrays is None:
            self._arrays = [np.load(self.folder / name, mmap_mode="r") for name in (ARRAY, CROPS, PLANS)]
        k, index = key
        target, crop, plan = (a[k, index] for a in self._arrays)
        return torch.from_numpy(np.array(target)), np.array(crop), torch.from_numpy(plan.astype(np.int64))

    @classmethod
    def open_or_build(cls, folder: Path, key: str, dataset, denoiser, acc, plans: int, dtype: str = "float16",
                      batch_size: int = 8, quiet: bool = False) -> "TargetCache":
        """Reuse `folder` if it holds a complete cache with `key`, else compute it (sharded over processes)."""
        folder = Path(folder)
        meta = folder / META
        if meta.is_file() and json.loads(meta.read_text()).get("key") == key:
            return cls(folder)
        n = len(dataset)
        specs = arrays(n, plans, denoiser.num_patches, denoiser.dim, dtype, dataset.size, denoiser.cfg.num)
        line = check_fits(folder, cache_bytes(n, plans, denoiser.num_patches, denoiser.dim, dtype, dataset.size,
                                              denoiser.cfg.num), n, plans, denoiser.num_patches, denoiser.dim, dtype)
        if not quiet:
            acc.print(line)
        dtype, shape = specs[ARRAY]
        tmp = {name: folder / f".{name}.tmp" for name in specs}
        try:
            if acc.is_main_process:
                with writing("the target cache", folder):
                    folder.mkdir(parents=True, exist_ok=True)
                    meta.unlink(missing_ok=True)
                    for name, (dt, sh) in specs.items():
                        np.lib.format.open_memmap(tmp[name], mode="w+", dtype=dt, shape=sh).flush()
                        _allocate(tmp[name])
            acc.wait_for_everyone()
            return cls._build(folder, key, dataset, denoiser, acc, plans, specs, tmp, shape, dtype, batch_size,
                              quiet)
        except BaseException:
            if acc.is_main_process:  # a cache that was not finished is only in the way (and may fill the disk)
                for path in tmp.values():
                    path.unlink(missing_ok=True)
            raise

    @classmethod
    def _build(cls, folder, key, dataset, denoiser, acc, plans, specs, tmp, shape, dtype, batch_size, quiet):
        meta, n = folder / META, len(dataset)
        out, crops, plan_out = (np.load(tmp[name], mmap_mode="r+") for name in (ARRAY, CROPS, PLANS))
        keys = [(k, i) for k in range(plans) for i in range(n)][acc.process_index::acc.num_processes]
        bar = tqdm(total=len(keys), disable=quiet or not acc.is_local_main_process, desc="teacher targets")
        bad: set[str] = set()
        for start in range(0, len(keys), batch_size):
            items = [dataset.item(*key, keep_crop=True) for key in keys[start:start + batch_size]]
            x = torch.stack([s["image"] for s in items]).to(acc.device)
            plan = torch.stack([s["plan"] for s in items]).to(acc.device)
            t = denoiser(x, plan).to("cpu", torch.float32).numpy()
            for (k, i), ti, item in zip(keys[start:start + batch_size], t, items):
                out[k, i], crops[k, i], plan_out[k, i] = ti, item["crop"], item["plan"].numpy()
                bad.update(item["bad"])
            bar.update(len(items))
        bar.close()
        for array in (out, crops, plan_out):
            array.flush()
        del out, crops, plan_out
        bad = set(gather_object(sorted(bad)))  # every process's undecodable files
        acc.wait_for_everyone()
        if acc.is_main_process:
            for name in specs:
                os.replace(tmp[name], folder / name)
            tmp.clear()
            per_image = sum(int(np.prod(sh[2:])) * np.dtype(dt).itemsize for dt, sh in specs.values())
            write_json(meta, dict(key=key, plans=plans, images=n, shape=list(shape), dtype=dtype.name,
                                  bytes_per_image_plan=per_image,
                                  target_bytes_per_image_plan=int(np.prod(shape[2:])) * dtype.itemsize,
                                  undecodable_files=sorted(bad)))
        acc.wait_for_everyone()
        return cls(folder)


def _allocate(path: Path) -> None:
    """Reserve the memory map's blocks now: a full disk is then an OSError here, not a SIGBUS in the middle of the
    build (a memory-mapped write has no way to report it)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # filesystems without fallocate
            raise
    finally:
        os.close(fd)
