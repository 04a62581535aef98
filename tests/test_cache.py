"""The target cache holds exactly what the uncached path computes, and survives what users do to it."""

import copy
import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from phreg.config.recipe import load_recipe
from phreg.data.images import ImageDataset, collate
from phreg.data.scan import scan_images
from phreg.errors import UsageError
from phreg.models.loading import load_teacher, normalization
from phreg.targets.cache import ARRAY, TargetCache, cache_key
from phreg.targets.teacher import DenoisedTeacher

from conftest import MODEL


def photo_cache(dinov2_file, size: int, *overrides: str):
    """What a cache test builds on: the recipe (DINOv2-S at `size` px plus `overrides`), its denoising teacher, the
    shipped photos and their dataset."""
    recipe = load_recipe(None, [f"model.name={MODEL}", f"model.checkpoint={dinov2_file}", f"model.img_size={size}",
                                *overrides])
    teacher = load_teacher(recipe.model)
    mean, std = normalization(teacher, recipe.model)
    denoiser = DenoisedTeacher(teacher, recipe.views, mean, std)
    files, _ = scan_images(None)
    return recipe, denoiser, files, ImageDataset(files, size, mean, std, recipe.seed, make_plan=denoiser.plan_fn())


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 2e-3)])  # float32: batch-size rounding only
def test_cached_batches_equal_the_uncached_path(tmp_path, dinov2_file, dtype, tol):
    recipe, denoiser, files, data = photo_cache(dinov2_file, 56, "views.num=3", "cache.plans=2", f"cache.dtype={dtype}")
    cache = TargetCache.open_or_build(tmp_path, cache_key(recipe, files), data, denoiser, Accelerator(cpu=True),
                                      plans=2, dtype=dtype, batch_size=3, quiet=True)
    cached = copy.copy(data)  # the same dataset, reading the cache
    cached.cache = cache
    for epoch, indices in [(0, [0, 3]), (1, [3, 1, 2]), (2, [0]), (5, [2, 0])]:  # epoch e uses variant e mod K
        fresh, hit = collate([data[(epoch % 2, i)] for i in indices]), cached.__getitems__([(epoch, i) for i in indices])
        assert hit["pixels"].dtype == torch.uint8 and torch.equal(fresh["pixels"], hit["pixels"])
        assert torch.equal(fresh["plan"], hit["plan"]) and hit["index"].tolist() == indices
        target = denoiser(denoiser.normalize(fresh["pixels"]), fresh["plan"])
        err = ((hit["target"].float() - target).abs().max() / target.abs().max()).item()
        assert err <= tol, err
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["target_bytes_per_image_plan"] == 16 * 384 * (4 if dtype == "float32" else 2)
    assert meta["bytes_per_image_plan"] == meta["target_bytes_per_image_plan"] + 56 * 56 * 3 + 3 * 3 * 2 + 4  # + crc

    before = (tmp_path / "targets.npy").stat().st_mtime_ns  # same key: reused, not rebuilt
    TargetCache.open_or_build(tmp_path, cache_key(recipe, files), data, denoiser, Accelerator(cpu=True), plans=2,
                              dtype=dtype, quiet=True)
    assert (tmp_path / "targets.npy").stat().st_mtime_ns == before
    other = load_recipe(None, [f"model.name={MODEL}", "model.img_size=56", "views.num=4", "cache.plans=2"])
    assert cache_key(other, files) != cache_key(recipe, files)  # another view count: another cache
    assert cache_key(recipe, files, "bf16") != cache_key(recipe, files, "fp32")  # bf16 targets are other targets
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"0" * 8)
    first = cache_key(recipe, files, weights=weights)
    weights.write_bytes(b"0" * 9)  # the file behind model.checkpoint replaced in place
    assert cache_key(recipe, files, weights=weights) != first


def test_a_cached_batch_read_in_a_data_worker_arrives_in_shared_memory(tmp_path, dinov2_file):
    """Workers read whole batches straight into shared memory (so sending them costs no copy): what the training
    process receives is the batch the main process would read itself."""
    from torch.utils.data import DataLoader

    recipe, denoiser, files, data = photo_cache(dinov2_file, 28, "views.num=2", "cache.plans=1")
    data.cache = TargetCache.open_or_build(tmp_path, cache_key(recipe, files), data, denoiser, Accelerator(cpu=True),
                                           plans=1, batch_size=2, quiet=True, workers=2)
    keys = [(0, 3), (0, 1)]
    loader = DataLoader(data, 2, sampler=keys, collate_fn=collate, num_workers=1)
    (received,) = list(loader)
    local = data.__getitems__(keys)
    for name in ("pixels", "plan", "target", "index"):
        assert torch.equal(received[name], local[name]), name
    assert not local["target"].is_shared()
    in_worker = data.cache.batch(keys, shared=True)  # what a worker reads (`get_worker_info()` set)
    assert in_worker["target"].is_shared() and in_worker["pixels"].is_shared()
    assert torch.equal(in_worker["target"], local["target"])


@pytest.mark.slow
def test_a_damaged_cache_is_repaired_a_truncated_one_rebuilt_and_damage_during_a_run_refused(tmp_path, dinov2_file,
                                                                                              capsys):
    """4 KB overwritten in the middle of targets.npy (a run must not train on NaN targets and exit 0) and
    targets.npy truncated (no `ValueError: mmap length...` traceback)."""
    recipe, denoiser, files, data = photo_cache(dinov2_file, 56, "views.num=2", "cache.plans=2", "cache.dtype=float16")
    key, acc = cache_key(recipe, files), Accelerator(cpu=True)

    def build():
        return TargetCache.open_or_build(tmp_path, key, data, denoiser, acc, plans=2, batch_size=4)

    build()
    path = tmp_path / ARRAY
    good = path.read_bytes()
    with open(path, "r+b") as f:  # a bad sector: same size, 4 KB of garbage in the middle
        f.seek(len(good) // 2)
        f.write(np.full(1024, np.nan, np.float32).tobytes())
    capsys.readouterr()
    build()
    err = capsys.readouterr().out
    assert "entries do not match their checksums" in err and "recomputing them" in err, err
    repaired = np.load(path, mmap_mode="r")
    assert np.isfinite(repaired).all() and path.read_bytes() == good  # recomputed to the same bytes

    with open(path, "r+b") as f:
        f.truncate(len(good) - 5000)
    build()
    assert "does not open" in capsys.readouterr().out and path.read_bytes() == good  # rebuilt whole

    cache = build()
    cache.batch([(0, 0)])  # opened and read by a run; then the disk goes bad under it
    with open(path, "r+b") as f:
        f.seek(len(good) - 1000)
        f.write(b"\xff" * 1000)
    with pytest.raises(UsageError, match=f"target cache {path}: entry \\(plan 1, image 3\\) does not match its "
                                         "checksum"):
        cache.batch([(1, 3)])


class StopAfter:
    """A stop request that arrives once `batches` batches of teacher targets were computed."""

    def __init__(self, denoiser, batches: int):
        self.denoiser, self.left, self.requested = denoiser, batches, None
        self.calls = 0

    def __call__(self, images, plans):
        self.calls += len(images)
        self.left -= 1
        if self.left == 0:
            self.requested = "SIGTERM"
        return self.denoiser(images, plans)

    def __getattr__(self, name):  # the rest of DenoisedTeacher's surface
        return getattr(self.denoiser, name)


def test_a_stopped_build_keeps_its_entries_and_the_next_run_computes_only_the_rest(tmp_path, dinov2_file):
    from phreg.errors import Preempted

    recipe, denoiser, files, data = photo_cache(dinov2_file, 28, "views.num=2", "cache.plans=2")
    key, acc = cache_key(recipe, files), Accelerator(cpu=True)
    TargetCache.open_or_build(tmp_path / "straight", key, data, denoiser, acc, plans=2, batch_size=2, quiet=True)

    stopping = StopAfter(denoiser, 3)  # 3 batches of 2: variant 0 whole, half of variant 1
    with pytest.raises(Preempted) as e:
        TargetCache.open_or_build(tmp_path / "c", key, data, stopping, acc, plans=2, batch_size=2, quiet=True,
                                  stop=stopping)
    assert e.value.signame == "SIGTERM" and e.value.kept == f"6 of 8 teacher targets in {tmp_path / 'c'}"
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["started"] == [0, 1] and meta["complete"] == [0]
    from phreg.run.folder import cache_build_unfinished

    assert cache_build_unfinished(tmp_path / "c") and not cache_build_unfinished(tmp_path / "straight")

    counting = StopAfter(denoiser, -1)  # never stops; counts the images it computes
    TargetCache.open_or_build(tmp_path / "c", key, data, counting, acc, plans=2, batch_size=2, quiet=True)
    assert counting.calls == 2  # only the two entries the stopped build had not written
    for name in ("targets.npy", "crops.npy", "plans.npy", "checksums.npy"):
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["complete"] == [0, 1]


def test_a_run_computes_only_the_plans_its_epochs_train_on(tmp_path, dinov2_file, capsys):
    recipe, denoiser, files, data = photo_cache(dinov2_file, 28, "views.num=2", "cache.plans=4")
    key, acc = cache_key(recipe, files), Accelerator(cpu=True)
    counting = StopAfter(denoiser, -1)
    TargetCache.open_or_build(tmp_path, key, data, counting, acc, plans=4, batch_size=2, variants=[0, 1])
    out = capsys.readouterr().out
    assert "computing the 2 of its 4 plans this run trains on" in out, out
    assert counting.calls == 2 * 4 and json.loads((tmp_path / "meta.json").read_text())["complete"] == [0, 1]
    counting.calls = 0
    cache = TargetCache.open_or_build(tmp_path, key, data, counting, acc, plans=4, batch_size=2)  # a longer run
    assert counting.calls == 2 * 4 and cache.complete == {0, 1, 2, 3}
