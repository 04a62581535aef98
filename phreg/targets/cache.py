"""Teacher-target cache: the teacher is frozen, so its denoised targets for a fixed (crop, view plan) never change.

With `cache.enabled`, each image gets K variants (crop + view plan drawn for key (seed, k, index)); their targets are
computed once into a memory-mapped float16 `.npy` of shape (K, N, L, D), next to the uint8 crops and plans, and epoch
e trains on variant e mod K without decoding a single image: the stored uint8 crop is the one the uncached path would
cut, normalized on the device like it. A batch is read whole, one gather per array (`TargetCache.batch`), by the
loader's data workers. The build overlaps decoding (data workers), the teacher (the device) and the writes (a thread).
The folder carries a key over everything the targets depend on; a folder with another key is rebuilt, one with this
key is reused (across `--resume` and across runs that point `cache.dir` at it).

A build can be stopped and continued: meta.json records which variants were started and which are complete, and the
checksums say which entries of a started one are written. A stop signal or Ctrl-C finishes the batch in hand and
stops (exit 75 / 130, with the command that continues); the next run computes only what is missing. A run computes
only the variants its epochs will train on (a 10-step run needs one or two of K), a longer run the rest.

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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..config.recipe import Recipe
from ..data.sources import fingerprint
from ..errors import UsageError, stopped
from ..files.atomic import write_json, writing
from ..run.folder import CACHE_META

ARRAY, CROPS, PLANS, META = "targets.npy", "crops.npy", "plans.npy", CACHE_META
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


TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                np.dtype(np.uint8): torch.uint8, np.dtype(np.int16): torch.int16}


def empty(shape: tuple, dtype: np.dtype, shared: bool) -> torch.Tensor:
    """An uninitialized tensor; `shared`: in shared memory (in a data worker: the batch then reaches the training
    process as a file descriptor, not as a copy)."""
    if not shared:
        return torch.empty(shape, dtype=TORCH_DTYPES[dtype])
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * dtype.itemsize)
    return torch.tensor([], dtype=TORCH_DTYPES[dtype]).set_(storage).view(shape)


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

    def batch(self, keys: list[tuple[int, int]], shared: bool = False) -> dict:
        """The batch of `keys` (epoch, image index), one epoch per batch (variant epoch mod K): each array is read
        with one gather straight into the batch's memory (`shared`: shared memory), and each entry checked against
        its checksum while that stays cheap. dict(pixels (B, 3, S, S) uint8, plan (B, V, 3), index, bad, target
        (B, L, D))."""
        if self._arrays is None:
            try:
                self._arrays = self.open_arrays()
            except CacheDamaged as e:
                raise UsageError(f"target cache damaged while in use: {e}; delete {self.folder} or run again to "
                                 f"rebuild it") from None
        k = keys[0][0] % self.plans
        index = np.fromiter((i for _, i in keys), np.int64, len(keys))
        out = []
        for a in self._arrays[:3]:
            t = empty((len(index), *a.shape[2:]), a.dtype, shared)
            np.take(a[k], index, axis=0, out=t.numpy())
            out.append(t)
        target, crop, plan = out
        if self.check_reads:
            self._check(k, index, target.numpy(), crop.numpy(), plan.numpy())
        return dict(pixels=crop.permute(0, 3, 1, 2), plan=plan.long(), index=torch.from_numpy(index), bad=[],
                    target=target)

    def _check(self, k: int, index: np.ndarray, target, crop, plan) -> None:
        began = time.perf_counter()
        sums = self._arrays[3][k]
        for j, i in enumerate(index):
            if entry_crc(target[j], crop[j], plan[j]) != int(sums[i]):
                raise UsageError(f"target cache {self.folder / ARRAY}: entry (plan {k}, image {i}) does not match "
                                 f"its checksum (damaged during the run); run again to recompute it, or delete "
                                 f"{self.folder}")
        now = time.perf_counter()
        self._checked_s += now - began
        self._first_read = self._first_read or began
        reads = now - self._first_read
        if reads > 5.0 and self._checked_s > CHECK_SHARE * reads:  # measured: too dear for this disk / model
            self.check_reads = False

    def entries_to_compute(self, variants: list[int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(damaged, missing) entries of `variants`: in variants the build finished, those whose bytes no longer match
        their checksums; in variants it started but did not finish (a stopped build), those not written yet (their
        checksums say which); every entry of a variant never started. One pass over what is read."""
        targets, crops, plans, sums = self.open_arrays()
        n, damaged, missing = self.meta["images"], [], []
        for k in variants:
            if k not in self.started:
                missing += [(k, i) for i in range(n)]
                continue
            bad = [(k, i) for i in range(n) if entry_crc(targets[k, i], crops[k, i], plans[k, i]) != int(sums[k, i])]
            (damaged if k in self.complete else missing).extend(bad)
        return damaged, missing

    @property
    def started(self) -> set[int]:
        return set(self.meta.get("started", range(self.plans)))  # a cache written whole has no such list

    @property
    def complete(self) -> set[int]:
        return set(self.meta.get("complete", range(self.plans)))

    def mark(self, acc, started: list[int] = (), complete: list[int] = ()) -> None:
        """Record variants as started / complete in meta.json (the main process writes, every process reads)."""
        self.meta["started"] = sorted(self.started | set(started))
        self.meta["complete"] = sorted(self.complete | set(complete))
        if acc.is_main_process:
            write_json(self.folder / META, self.meta)
        acc.wait_for_everyone()

    @classmethod
    def open_or_build(cls, folder: Path, key: str, dataset, denoiser, acc, plans: int, dtype: str = "float16",
                      batch_size: int = 8, quiet: bool = False, workers: int = 0, variants: list[int] | None = None,
                      stop=None) -> "TargetCache":
        """The cache in `folder` for `key`, with every entry of `variants` (default: all) computed: a complete cache is
        reused, a stopped build continued, damaged entries recomputed, anything else (another key, an unreadable
        cache) built anew. Sharded over processes; `workers`: data workers that decode and crop while the teacher
        runs. `stop` (`StopRequests`): on a stop signal the batch in hand is finished and written, and the build
        raises `Preempted` (Ctrl-C: `Interrupted`); what was written is kept for the next run."""
        say = (lambda *a: None) if quiet else acc.print
        variants = list(range(plans)) if variants is None else sorted(variants)
        cache = cls.reopen(folder, key, say)
        acc.wait_for_everyone()  # every process has read the folder as it was before any of them writes to it
        if cache is None:
            cache = cls.allocate(folder, key, len(dataset), plans, denoiser, dataset.size, dtype, acc, quiet)
        damaged, missing = cache.entries_to_compute(variants)  # every process alike: they agree on what follows
        if damaged:
            say(f"phreg: warning: target cache {cache.folder / ARRAY}: {len(damaged)} of {plans * len(dataset)} "
                f"entries do not match their checksums (a damaged disk or copy); recomputing them")
        if missing and len(variants) < plans and not set(variants) <= cache.started:
            say(f"target cache: computing the {len(variants)} of its {plans} plans this run trains on (the others when "
                f"a longer run needs them)")
        started = [k for k in variants if k in cache.started and k not in cache.complete]
        if started and missing:
            need = len(variants) * len(dataset)
            say(f"target cache {cache.folder}: continuing its build: {need - len(missing) - len(damaged)} of {need} "
                f"entries are there")
        cache.compute(damaged + missing, variants, dataset, denoiser, acc, batch_size, workers, quiet, stop)
        return cls(cache.folder)

    @classmethod
    def reopen(cls, folder: Path, key: str, say) -> "TargetCache | None":
        """The cache in `folder` if it is one for `key` whose files open as its metadata says (complete or not)."""
        meta = Path(folder) / META
        if not meta.is_file() or json.loads(meta.read_text()).get("key") != key:
            return None
        cache = cls(folder)
        try:
            cache.open_arrays()
        except CacheDamaged as e:
            say(f"phreg: warning: target cache {e}; rebuilding it")
            return None
        return cache

    @classmethod
    def allocate(cls, folder: Path, key: str, images: int, plans: int, denoiser, img_size: int, dtype: str, acc,
                 quiet: bool) -> "TargetCache":
        """Empty arrays of the cache's full size on disk (reserved now: a full disk is an error here, not a SIGBUS
        in the middle of the build) and meta.json with no variant started."""
        folder = Path(folder)
        specs = arrays(images, plans, denoiser.num_patches, denoiser.dim, dtype, img_size, denoiser.cfg.num)
        size = cache_bytes(images, plans, denoiser.num_patches, denoiser.dim, dtype, img_size, denoiser.cfg.num)
        line = check_fits(folder, size, images, plans, denoiser.num_patches, denoiser.dim, dtype)
        if not quiet:
            acc.print(line)
        target_dtype, shape = specs[ARRAY]
        if acc.is_main_process:
            with writing("the target cache", folder):
                folder.mkdir(parents=True, exist_ok=True)
                (folder / META).unlink(missing_ok=True)  # the arrays are not this cache's until meta.json says so
                for name, (dt, sh) in specs.items():
                    np.lib.format.open_memmap(folder / name, mode="w+", dtype=dt, shape=sh).flush()
                    _allocate(folder / name)
                per_image = sum(int(np.prod(sh[2:])) * np.dtype(dt).itemsize for dt, sh in specs.values())  # + crc
                write_json(folder / META, dict(key=key, plans=plans, images=images, shape=list(shape),
                                               dtype=target_dtype.name, bytes_per_image_plan=per_image,
                                               target_bytes_per_image_plan=int(np.prod(shape[2:]))
                                               * target_dtype.itemsize, started=[], complete=[],
                                               undecodable_files=[]))
        acc.wait_for_everyone()
        return cls(folder)

    def compute(self, todo: list[tuple[int, int]], variants: list[int], dataset, denoiser, acc, batch_size: int,
                workers: int, quiet: bool, stop=None) -> None:
        """Compute the entries `todo`, variant by variant (each process its share), marking each variant of
        `variants` complete once every process has written its part."""
        arrays_ = [np.load(self.folder / name, mmap_mode="r+") for name in (ARRAY, CROPS, PLANS, CHECKSUMS)]
        total = len(todo[acc.process_index::acc.num_processes])
        undecodable, signame = set(self.meta.get("undecodable_files", [])), None
        with tqdm(total=total, disable=quiet or not acc.is_local_main_process or not total,
                  desc="teacher targets") as bar:  # closed on the way out, whatever stops the build
            for k in variants:
                keys = [key for key in todo if key[0] == k][acc.process_index::acc.num_processes]
                if k not in self.started:
                    self.mark(acc, started=[k])
                undecodable |= compute_entries(keys, dataset, denoiser, acc, arrays_, batch_size, workers, bar, stop)
                signame = next((s for s in gather_object([stop.requested if stop else None]) if s), None)
                undecodable = set(gather_object(sorted(undecodable)))  # every process's undecodable files
                self.meta["undecodable_files"] = sorted(undecodable)
                self.mark(acc, complete=[] if signame else [k])
                if signame:
                    break
        if signame:
            raise stopped(0, None, signame, kept=self.progress(variants))

    def progress(self, variants: list[int]) -> str:
        """What a stopped build keeps, in words."""
        targets, crops, plans, sums = self.open_arrays()
        n = self.meta["images"]
        done = sum(entry_crc(targets[k, i], crops[k, i], plans[k, i]) == int(sums[k, i])
                   for k in variants if k in self.started for i in range(n))
        return f"{done} of {len(variants) * n} teacher targets in {self.folder}"


def compute_entries(keys: list[tuple[int, int]], dataset, denoiser, acc, arrays: list, batch_size: int,
                    workers: int = 0, bar=None, stop=None) -> set[str]:
    """Teacher targets of the (variant, image) `keys` into the memory maps `arrays` (targets, crops, plans,
    checksums), with their crops, plans and checksums. Three stages overlap: data workers decode and crop the next
    batches, the device runs the teacher on this one, and a writer thread stores the previous one (on a GPU its copy
    to the host runs behind the next forward). A stop request (`stop.requested`) ends it after the batch in hand.
    Returns the files that failed to decode."""
    from torch.utils.data import DataLoader

    from ..data.images import collate

    cuda = acc.device.type == "cuda"
    if not keys:
        return set()
    loader = DataLoader(dataset, batch_size, sampler=keys, collate_fn=collate, num_workers=workers, pin_memory=cuda)
    dtype = TORCH_DTYPES[arrays[0].dtype]
    bad: set[str] = set()
    with ThreadPoolExecutor(1, thread_name_prefix="phreg-cache-writer") as writer:
        pending: deque = deque()
        for start, batch in zip(range(0, len(keys), batch_size), loader):
            pixels, plan = (batch[name].to(acc.device, non_blocking=True) for name in ("pixels", "plan"))
            target = denoiser(denoiser.normalize(pixels), plan).to(dtype)
            host, ready = _to_host(target)
            if len(pending) == 2:  # at most two batches in flight: bounded memory, and a write error surfaces here
                pending.popleft().result()
            pending.append(writer.submit(_store, arrays, keys[start:start + len(host)], host, ready, batch))
            bad.update(batch["bad"])
            if bar is not None:
                bar.update(len(host))
            if stop is not None and stop.requested:
                break
        while pending:
            pending.popleft().result()
    for array in arrays:
        array.flush()
    return bad


def _to_host(t: torch.Tensor):
    """Start copying `t` to pinned host memory; returns it and a function that waits until the copy is done."""
    if t.device.type != "cuda":
        return t, lambda: None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done.synchronize


def _store(arrays: list, keys: list[tuple[int, int]], target: torch.Tensor, ready, batch: dict) -> None:
    """The writer thread: one batch's entries and their checksums into the memory maps."""
    ready()
    targets, crops, plans, sums = arrays
    pixels, plan = batch["pixels"].permute(0, 2, 3, 1).numpy(), batch["plan"].numpy()
    for j, (k, i) in enumerate(keys):
        targets[k, i], crops[k, i], plans[k, i] = target[j].numpy(), pixels[j], plan[j]
        sums[k, i] = entry_crc(targets[k, i], crops[k, i], plans[k, i])


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
