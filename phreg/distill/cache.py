"""Teacher-target cache: the teacher is frozen, so its denoised targets for a fixed (crop, view plan) never change.

With `cache.enabled`, each image gets K variants (crop + view plan drawn for key (seed, k, index)); their targets are
computed once into a memory-mapped float16 `.npy` of shape (K, N, L, D), next to the uint8 crops and plans, and epoch
e trains on variant e mod K without decoding a single image. Normalizing the stored uint8 crop gives exactly the
tensor the uncached path computes.
The folder carries a key over everything the targets depend on; a folder with another key is rebuilt, a complete one is
reused (across `--resume` and across runs that point `cache.dir` at it).

A shared cache is not trusted blindly: every (variant, image) entry has a CRC32 over its target, crop and plan bytes
(`checksums.npy`). A run that opens the cache checks the files' sizes and headers and every entry's checksum once
(zlib's CRC32 reads at disk / page-cache speed: a second for ~1 GB); damaged entries (a bad sector, a torn copy) are
recomputed by the teacher in place, a truncated or unreadable cache is rebuilt, and each is said in one line. While
training, each entry a step reads is checked again as long as that costs under 2% of the time between reads
(measured), so damage that appears during a run is refused in one line naming the file instead of becoming NaN.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import zlib
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
CHECKSUMS = "checksums.npy"  # (plans, images) uint32: CRC32 of each entry's target, crop and plan bytes
CHECK_SHARE = 0.02  # per-read checks stay on while they cost less than this share of the time between reads


def cache_key(recipe: Recipe, files: list[Path], teacher_precision: str = "fp32", weights: Path | None = None) -> str:
    """Everything a target depends on: the weights (path, size, mtime), the teacher's precision (bf16 targets are
    not fp32 targets), resolution, views, crops, the image files themselves."""
    m, v, d = recipe.model, recipe.views, recipe.data
    stats = fingerprint(files)
    parts = dict(format=4, name=m.name, checkpoint=m.checkpoint, img_size=m.img_size, mean=m.mean, std=m.std,
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
    plans, the entries' checksums. One description for building the cache and for every size it reports."""
    return {ARRAY: (np.dtype(dtype), (plans, images, tokens, dim)),
            CROPS: (np.dtype(np.uint8), (plans, images, img_size, img_size, 3)),
            PLANS: (np.dtype(np.int16), (plans, images, views, 3)),
            CHECKSUMS: (np.dtype(np.uint32), (plans, images))}


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


def entry_crc(target: np.ndarray, crop: np.ndarray, plan: np.ndarray) -> int:
    """CRC32 of one cache entry as stored (target, then crop, then plan bytes)."""
    crc = zlib.crc32(memoryview(np.ascontiguousarray(target)).cast("B"))
    crc = zlib.crc32(memoryview(np.ascontiguousarray(crop)).cast("B"), crc)
    return zlib.crc32(memoryview(np.ascontiguousarray(plan)).cast("B"), crc)


class CacheDamaged(Exception):
    """The cache's files cannot be read as the arrays its metadata describes (truncated, replaced, missing)."""


class TargetCache:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META).read_text())
        self.plans = self.meta["plans"]
        self._arrays = None  # memory maps, opened lazily once per data worker
        self.check_reads = True  # per-read checksum checks, while they cost under CHECK_SHARE of the reading time
        self._checked_s, self._first_read = 0.0, None

    def __getstate__(self):
        return dict(self.__dict__, _arrays=None)

    def open_arrays(self) -> list:
        """The memory maps (targets, crops, plans, checksums); `CacheDamaged` naming the file when one does not have
        the shape and dtype the metadata says (a truncated copy raises this, not numpy's mmap ValueError)."""
        out = []
        n, k = self.meta["images"], self.meta["plans"]
        want = {ARRAY: tuple(self.meta["shape"]), CROPS: None, PLANS: None, CHECKSUMS: (k, n)}
        for name in (ARRAY, CROPS, PLANS, CHECKSUMS):
            path = self.folder / name
            try:
                a = np.load(path, mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:
                raise CacheDamaged(f"{path} does not open ({type(e).__name__}: {str(e)[:120]})") from None
            if want[name] is not None and a.shape != want[name] or a.shape[:2] != (k, n):
                raise CacheDamaged(f"{path} has shape {a.shape}, its metadata says {want[name] or (k, n)}")
            out.append(a)
        return out

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        """(target (L, D), uint8 crop (S, S, 3), plan (V, 3)) of variant k of image `index`."""
        if self._arrays is None:
            try:
                self._arrays = self.open_arrays()
            except CacheDamaged as e:
                raise UsageError(f"target cache damaged while in use: {e}; delete {self.folder} or run again to "
                                 f"rebuild it") from None
        k, index = key
        target, crop, plan = (np.array(a[k, index]) for a in self._arrays[:3])
        if self.check_reads:
            self._check(k, index, target, crop, plan)
        return torch.from_numpy(target), crop, torch.from_numpy(plan.astype(np.int64))

    def _check(self, k: int, index: int, target, crop, plan) -> None:
        began = time.perf_counter()
        if entry_crc(target, crop, plan) != int(self._arrays[3][k, index]):
            raise UsageError(f"target cache {self.folder / ARRAY}: entry (plan {k}, image {index}) does not match "
                             f"its checksum (damaged during the run); run again to recompute it, or delete "
                             f"{self.folder}")
        now = time.perf_counter()
        self._checked_s += now - began
        self._first_read = self._first_read or began
        reads = now - self._first_read
        if reads > 5.0 and self._checked_s > CHECK_SHARE * reads:  # measured: too dear for this disk / model
            self.check_reads = False

    def damaged_entries(self) -> list[tuple[int, int]]:
        """Every (variant, image) whose bytes do not match its checksum: one pass over the files."""
        targets, crops, plans, sums = self.open_arrays()
        return [(k, i) for k in range(self.plans) for i in range(self.meta["images"])
                if entry_crc(targets[k, i], crops[k, i], plans[k, i]) != int(sums[k, i])]

    def repair(self, bad: list[tuple[int, int]], dataset, denoiser, acc, batch_size: int = 8) -> None:
        """Recompute the entries `bad` in place (the same crop, plan and target the build computed: all are drawn
        from (seed, variant, image))."""
        targets, crops, plans, sums = (np.load(self.folder / name, mmap_mode="r+")
                                       for name in (ARRAY, CROPS, PLANS, CHECKSUMS))
        for start in range(0, len(bad), batch_size):
            keys = bad[start:start + batch_size]
            items = [dataset.item(*key, keep_crop=True) for key in keys]
            x = torch.stack([s["image"] for s in items]).to(acc.device)
            plan = torch.stack([s["plan"] for s in items]).to(acc.device)
            t = denoiser(x, plan).to("cpu", torch.float32).numpy()
            for (k, i), ti, item in zip(keys, t, items):
                targets[k, i], crops[k, i], plans[k, i] = ti, item["crop"], item["plan"].numpy()
                sums[k, i] = entry_crc(targets[k, i], crops[k, i], plans[k, i])
        for array in (targets, crops, plans, sums):
            array.flush()

    @classmethod
    def open_or_build(cls, folder: Path, key: str, dataset, denoiser, acc, plans: int, dtype: str = "float16",
                      batch_size: int = 8, quiet: bool = False) -> "TargetCache":
        """Reuse `folder` if it holds a complete cache with `key`, else compute it (sharded over processes)."""
        folder = Path(folder)
        meta = folder / META
        if meta.is_file() and json.loads(meta.read_text()).get("key") == key:
            say = (lambda *a: None) if quiet else acc.print
            cache = cls(folder)
            try:
                bad = cache.damaged_entries()  # every process alike: they agree on what happens next
            except CacheDamaged as e:
                say(f"phreg: warning: target cache {e}; rebuilding it")
            else:
                if bad:
                    say(f"phreg: warning: target cache {folder / ARRAY}: {len(bad)} of {cache.plans * len(dataset)} "
                        f"entries do not match their checksums (a damaged disk or copy); recomputing them")
                    if acc.is_main_process:
                        cache.repair(bad, dataset, denoiser, acc, batch_size)
                acc.wait_for_everyone()
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
        out, crops, plan_out, sums = (np.load(tmp[name], mmap_mode="r+") for name in (ARRAY, CROPS, PLANS, CHECKSUMS))
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
                sums[k, i] = entry_crc(out[k, i], crops[k, i], plan_out[k, i])
                bad.update(item["bad"])
            bar.update(len(items))
        bar.close()
        for array in (out, crops, plan_out, sums):
            array.flush()
        del out, crops, plan_out, sums
        bad = set(gather_object(sorted(bad)))  # every process's undecodable files
        acc.wait_for_everyone()
        if acc.is_main_process:
            for name in specs:
                os.replace(tmp[name], folder / name)
            tmp.clear()
            per_image = sum(int(np.prod(sh[2:])) * np.dtype(dt).itemsize for dt, sh in specs.values())  # + 4 B crc
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
