"""Data beyond a folder: WebDataset shards and a Hugging Face (Arrow) dataset each feed a real run."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import torch
import pytest
from conftest import MODEL

from phreg.config.recipe import load_recipe
from phreg.data.scan import kind
from phreg.data.sources import ShardImages, count_samples, held_out, open_sources, sample_keys, shard_urls
from phreg.distill.loop import distill
from phreg.errors import UsageError


def frames(camvid, n: int) -> list[Path]:
    return sorted(camvid["train"].iterdir())[:n]


def write_shards(folder: Path, files: list[Path], per_shard: int, broken: int | None = None) -> str:
    """WebDataset shards as `tar` writes them: <key>.png + <key>.json per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(files), per_shard):
        with tarfile.open(folder / f"shard-{s // per_shard:03d}.tar", "w") as tar:
            for i, f in enumerate(files[s:s + per_shard], start=s):
                image = folder / f"{i:05d}.png"
                image.write_bytes(b"not an image" if i == broken else f.resolve().read_bytes())
                tar.add(image, arcname=image.name)
                meta = folder / f"{i:05d}.json"
                meta.write_text(json.dumps(dict(source=f.name)))
                tar.add(meta, arcname=meta.name)
                image.unlink()
                meta.unlink()
    last = (len(files) - 1) // per_shard
    return str(folder / f"shard-{{000..{last:03d}}}.tar")


def run_recipe(tmp_path, dinov2_file, root, *extra):
    return load_recipe(None, [f"output_dir={tmp_path / 'run'}", f"model.name={MODEL}", f"model.checkpoint={dinov2_file}",
                              "model.img_size=56", "model.registers=4", "views.num=2", "data.num_workers=0",
                              f"data.root={root}", "train.batch_size=2", "train.epochs=1", "train.save_every=0",
                              "train.log_every=1", *extra])


def test_webdataset_shards_feed_a_run_and_count_a_broken_sample(tmp_path, dinov2_file, camvid):
    pattern = write_shards(tmp_path / "shards", frames(camvid, 7), per_shard=3, broken=4)
    assert kind(pattern) == "wds" and len(shard_urls(pattern)) == 3
    assert [count_samples(u) for u in shard_urls(pattern)] == [3, 3, 1]
    run = distill(run_recipe(tmp_path, dinov2_file, pattern), quiet=True)
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # one process, batch 2: whole batches per epoch -> 3 steps of the 7 samples; the broken one replaced and counted
    assert summary["steps"] == 3 and len([r for r in rows if "loss" in r]) == 3
    assert summary["undecodable_files"] == [f"{shard_urls(pattern)[1]}:00004"]
    assert (run / "export" / "model.safetensors").is_file()


def test_webdataset_ranks_read_disjoint_shards_equally_and_deterministically(tmp_path, camvid):
    pattern = write_shards(tmp_path / "shards", frames(camvid, 10), per_shard=2)
    urls = shard_urls(pattern)
    counts = [count_samples(u) for u in urls]
    plan = lambda rng: np.asarray(rng.integers(0, 100, 3))  # noqa: E731
    seen = {}
    for rank in range(2):
        data = ShardImages(urls, counts, 28, (0.5,) * 3, (0.5,) * 3, seed=1, make_plan=plan, rank=rank, world=2,
                           workers=2, batch_size=2)
        data.set_epoch(3)
        first = [(int(s["index"]), s["plan"].tolist()) for s in data]
        again = [(int(s["index"]), s["plan"].tolist()) for s in data]
        assert first == again and len(first) == len(data) == 4  # 5 shards: 3 and 2 -> both ranks 4 (2 batches)
        seen[rank] = {i for i, _ in first}
        data.set_epoch(4)
        assert [(int(s["index"]), s["plan"].tolist()) for s in data] != first
    assert not seen[0] & seen[1]


def test_arrow_dataset_feeds_a_run_with_a_held_out_split(tmp_path, dinov2_file, camvid):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [str(f.resolve()) for f in frames(camvid, 6)], "label": list(range(6))})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "arrow"))
    assert kind(tmp_path / "arrow") == "hf"
    recipe = run_recipe(tmp_path, dinov2_file, tmp_path / "arrow", "data.val_split=0.34", "cache.enabled=true",
                        "cache.plans=1")
    src = open_sources(recipe.data, recipe.seed)
    assert (len(src.train), len(src.val)) == (4, 2)
    run = distill(recipe, quiet=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["heldout"]["student"] < summary["heldout"]["teacher"] + 0.05
    assert (run / "export" / "model.safetensors").is_file()


def test_streaming_sources_refuse_what_needs_random_access(tmp_path, dinov2_file, camvid):
    pattern = write_shards(tmp_path / "shards", frames(camvid, 2), per_shard=2)
    with pytest.raises(UsageError, match="cache.enabled"):
        distill(run_recipe(tmp_path, dinov2_file, pattern, "cache.enabled=true"), quiet=True)
    with pytest.raises(UsageError, match="not found"):
        shard_urls(str(tmp_path / "nothing-{000..001}.tar"))


def test_webdataset_resume_replays_the_same_stream(tmp_path, camvid):
    """`--resume` skips the batches already trained on: the rest of the epoch is the same stream (same workers)."""
    from accelerate import Accelerator
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from phreg.data.images import collate

    pattern = write_shards(tmp_path / "shards", frames(camvid, 8), per_shard=2)
    urls = shard_urls(pattern)
    data = ShardImages(urls, [count_samples(u) for u in urls], 28, (0.5,) * 3, (0.5,) * 3, seed=2,
                       make_plan=lambda rng: torch.as_tensor(rng.integers(0, 100, 3)), workers=2, batch_size=2)
    loader = prepare_data_loader(DataLoader(data, 2, collate_fn=collate, num_workers=2), num_processes=1,
                                 process_index=0)
    loader.set_epoch(1)
    full = [(b["index"].tolist(), b["pixels"].sum().item()) for b in loader]
    skipped = Accelerator(cpu=True).skip_first_batches(loader, 2)
    skipped.set_epoch(1)
    assert len(full) == 4 and [(b["index"].tolist(), b["pixels"].sum().item()) for b in skipped] == full[2:]


def test_webdataset_val_split_holds_out_by_key_alike_on_every_rank_worker_and_order(tmp_path, camvid):
    pattern = write_shards(tmp_path / "shards", frames(camvid, 12), per_shard=4)
    data = load_recipe(None, [f"data.root={pattern}", "data.val_split=0.25"]).data
    src = open_sources(data, 0)
    urls = shard_urls(pattern)
    ids = [f"{Path(u).name}/{k}" for u in urls for k in sample_keys(u)]
    assert 0 < len(src.held) < 12 and src.held <= set(ids)
    assert sum(src.shard_counts) == 12 - len(src.held) and len(src.val) == len(src.held)
    assert {str(r).rsplit("/", 1)[-1].replace(":", "/") for r in src.val} == src.held  # the bytes of those samples
    assert held_out(ids[::-1], 0.25, 0) == src.held == open_sources(data, 0).held  # not the order: the key
    assert held_out(ids[:6], 0.25, 0) == src.held & set(ids[:6]) or not src.held & set(ids[:6])  # each alone
    assert held_out(ids, 0.25, 1) != src.held  # the seed draws another set
    plan = lambda rng: torch.as_tensor(rng.integers(0, 100, 3))  # noqa: E731
    for world, workers in [(1, 1), (2, 1), (1, 3)]:  # every rank and worker skips exactly the held-out samples
        seen = []
        for rank in range(world):
            stream = ShardImages(urls, src.shard_counts, 28, (0.5,) * 3, (0.5,) * 3, make_plan=plan, rank=rank,
                                 world=world, workers=workers, held=src.held)
            seen += [int(x["index"]) for w in range(workers) for x in stream._worker_samples(w, __import__("webdataset"))]
        assert len(seen) == len(set(seen)) and max(seen) < 12 - len(src.held)


@pytest.mark.slow
def test_the_quickstart_runs_from_webdataset_shards_with_its_val_split(tmp_path, dinov2_file):
    """The quickstart (val_split 0.25) with its four photos written as shards runs as the folder does."""
    from phreg.data.scan import embedded_photos

    pattern = write_shards(tmp_path / "shards", sorted(embedded_photos().glob("*.*g")), per_shard=2)
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "quickstart.yaml",
                         [f"output_dir={tmp_path / 'run'}", f"model.checkpoint={dinov2_file}", f"data.root={pattern}",
                          "model.img_size=56", "views.num=2", "train.batch_size=1", "train.max_steps=2",
                          "train.epochs=1", "cache.enabled=false"])
    assert recipe.data.val_split == 0.25
    run = distill(recipe, quiet=True)
    summary = json.loads((run / "summary.json").read_text())
    held = summary["data"]["heldout"]
    assert held["source"] == "data.val_split=0.25" and held["images"] == len(held["names"]) >= 1
    assert summary["heldout"]["student"] is not None and (run / "export" / "model.safetensors").is_file()
