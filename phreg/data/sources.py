"""Images beyond a folder: WebDataset shards and Hugging Face datasets, read by their own libraries.

`data.root` / `data.val_root` may be:

* a folder of image files (`phreg.data.scan_images`, unchanged);
* a folder written by `datasets.Dataset.save_to_disk` (Arrow), a folder of Parquet/Arrow files, or `hfds/NAME[:SPLIT]`
  (a Hugging Face hub dataset, or anything `datasets.load_dataset` takes): random access by row, so such a dataset is
  a drop-in for the file list: same sampler, same per-sample `default_rng([seed, epoch, index])`, same `--resume`
  guarantee, target cache included;
* WebDataset shards: `shards-{000000..000127}.tar`, a `.tar` URL anything `webdataset`/`fsspec` opens (`pipe:`,
  `s3://`, `https://`), optionally prefixed `wds/`. Shards stream: each process reads its own shards
  (`shards[rank::world]`), each data worker its own of those, in a (seed, epoch)-shuffled order. See `ShardImages`.
  `data.val_split` holds samples out by a stable hash of their id (shard file name + key, `held_out`): the same
  choice on every rank, worker count and resume.
"""

from __future__ import annotations

import hashlib
import importlib.util
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import UsageError
from .images import ImageDataset
from .scan import IMAGE_SUFFIXES, kind
from .split import split_files

IMAGE_EXTS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class Record:
    """One image of a dataset that is not a file: decoded by `phreg.data.load_rgb` like a file (`read_bytes`)."""
    source: object
    index: int

    def read_bytes(self) -> bytes:
        return self.source.read_bytes(self.index)

    def __str__(self) -> str:
        return f"{self.source.name}[{self.index}]"


# --------------------------------------------------------------------------------------------- what a root names

# --------------------------------------------------------------------------------------------- Hugging Face datasets

class HFImages:
    """The image column of a Hugging Face dataset as a sequence of `Record`s (rows read lazily, Arrow memory-mapped).

    Images are taken undecoded (`datasets.Image(decode=False)`) and decoded by phreg itself, so EXIF rotation, 16-bit
    and alpha are handled as for files, and an undecodable row is skipped and counted like an undecodable file.
    """

    def __init__(self, ds, column: str, name: str, rows: np.ndarray | None = None):
        self.ds, self.column, self.name = ds, column, name
        self.rows = np.arange(len(ds)) if rows is None else rows

    @classmethod
    def open(cls, root: str, prefer_split: str = "train") -> "HFImages":
        import datasets

        try:
            if root.startswith("hfds/"):
                name, _, split = root[len("hfds/"):].partition(":")
                ds = datasets.load_dataset(name, split=split or prefer_split)
            elif any((Path(root) / f).is_file() for f in ("state.json", "dataset_dict.json")):
                ds = datasets.load_from_disk(root)
            else:
                files = sorted(str(p) for p in Path(root).rglob("*.parquet")) or \
                    sorted(str(p) for p in Path(root).glob("*.arrow"))
                ds = datasets.load_dataset("parquet" if files[0].endswith(".parquet") else "arrow",
                                           data_files=files, split="train")
        except Exception as e:  # datasets raises many types for missing names, offline hubs, bad folders
            raise UsageError(f"data {root}: not a readable Hugging Face dataset ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from None
        if isinstance(ds, datasets.DatasetDict):
            split = prefer_split if prefer_split in ds else next(iter(ds))
            ds = ds[split]
        columns = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
        if not columns:
            raise UsageError(f"data {root}: no image column (features: {', '.join(ds.features)})")
        ds = ds.cast_column(columns[0], datasets.Image(decode=False)).select_columns([columns[0]])
        return cls(ds, columns[0], root.rstrip("/"))

    @property
    def fingerprint(self) -> str:
        """What the target cache keys on instead of file sizes and dates: the dataset's own fingerprint, rows."""
        return f"{self.ds._fingerprint}:{len(self.rows)}:{int(self.rows.sum())}"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return HFImages(self.ds, self.column, self.name, self.rows[i])
        return Record(self, int(self.rows[i]))

    def read_bytes(self, row: int) -> bytes:
        value = self.ds[row][self.column]
        if value.get("bytes"):
            return value["bytes"]
        return Path(value["path"]).read_bytes()

    def split(self, fraction: float, seed: int) -> tuple["HFImages", "HFImages"]:
        """The same held-out choice as `split_files` makes for a list of that length."""
        train, held = split_files(list(range(len(self))), fraction, seed)
        return (HFImages(self.ds, self.column, self.name, self.rows[np.asarray(train, dtype=np.int64)]),
                HFImages(self.ds, self.column, self.name, self.rows[np.asarray(held, dtype=np.int64)]))


# --------------------------------------------------------------------------------------------- WebDataset shards

def shard_urls(root: str) -> list[str]:
    from webdataset.shardlists import expand_urls

    root = root[len("wds/"):] if root.startswith("wds/") else root
    urls = [u for part in root.split("::") for u in expand_urls(part)]
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise UsageError(f"data {root}: shard {missing[0]} not found ({len(missing)} of {len(urls)} missing)")
    return urls


def _image_key(name: str) -> str | None:
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return key if key and ext and ext.lower().rsplit(".", 1)[-1] in IMAGE_EXTS else None


def sample_keys(url: str) -> list[str]:
    """The keys of one shard's image samples, in tar order: member headers only for a local tar; a remote one is
    streamed once."""
    import webdataset as wds

    try:
        if Path(url).is_file():
            with tarfile.open(url) as tar:
                names = tar.getnames()
        else:
            with wds.gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                names = [m.name for m in tar]
    except (OSError, tarfile.TarError) as e:
        raise UsageError(f"shard {url}: not a readable tar ({type(e).__name__}: {e})") from None
    return list(dict.fromkeys(k for k in map(_image_key, names) if k))


def count_samples(url: str) -> int:
    """Image samples in one shard."""
    return len(sample_keys(url))


def sample_id(url: str, key: str) -> str:
    """What names a sample wherever its shards are moved: the shard's file name and the sample's key."""
    return f"{url.rstrip('/').rsplit('/', 1)[-1]}/{key}"


def held_out(ids: list[str], fraction: float, seed: int) -> set[str]:
    """The samples `data.val_split` holds out of a stream: those whose stable hash of (seed, id) falls below
    `fraction`, so every rank, data worker and resumed run decides each sample alike and alone; at least one (the
    lowest hash) when `fraction` > 0, as for folders."""
    if fraction <= 0 or not ids:
        return set()
    h = {i: int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") / 2**64 for i in ids}
    held = {i for i, v in h.items() if v < fraction}
    return held if held else {min(h, key=h.get)}


class ShardImages(IterableDataset):
    """WebDataset shards as a stream of training samples, each one the same dict `ImageDataset` yields.

    Assignment is fixed: process r reads `shards[r::world]`, its data worker w reads `those[w::workers]`; each epoch
    a worker visits its shards in an order drawn from (seed, epoch, rank, worker) and their samples in tar order (the
    WebDataset convention: shuffle samples when writing shards). A sample's crop and view plan come from
    `default_rng([seed, epoch, id])` where id is its position in the whole shard list, exactly as for a file.
    Every process yields the same number of samples per epoch, a whole number of batches per worker (what does not
    fill whole batches is left out, at the end of a worker's epoch), so DDP ranks never wait on each other. An undecodable sample is replaced by the next
    decodable one of the same worker and reported in `bad`. Samples in `held` (ids of `sample_id`, held out by
    `data.val_split`) are skipped, and `counts` are those of the samples that train.
    """

    def __init__(self, urls: list[str], counts: list[int], img_size: int, mean, std, seed: int = 0, resize: int = 0,
                 make_plan=None, rank: int = 0, world: int = 1, workers: int = 0, batch_size: int = 1,
                 held: set[str] = frozenset()):
        self.urls, self.seed, self.rank, self.world, self.epoch = urls, seed, rank, world, 0
        self.held = set(held)
        self.offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.counts = list(counts)
        self.decoder = ImageDataset([], img_size, mean, std, seed, resize, train=True, make_plan=make_plan)
        self.workers = max(1, workers)
        self.quota = self._quotas(batch_size)
        if sum(self.quota[rank]) == 0:
            raise UsageError(f"data: {sum(counts)} samples in {len(urls)} shard(s) are too few for {world} "
                             f"process(es) x {self.workers} worker(s) x batch {batch_size}")

    def _shards(self, rank: int, worker: int) -> list[int]:
        return list(range(len(self.urls)))[rank::self.world][worker::self.workers]

    def _quotas(self, batch: int) -> list[list[int]]:
        """quota[r][w]: samples worker w of process r yields per epoch; the same total on every process."""
        cap = [[sum(self.counts[s] for s in self._shards(r, w)) // batch * batch for w in range(self.workers)]
               for r in range(self.world)]
        total = min(sum(c) for c in cap)
        quota = []
        for caps in cap:
            left, q = total, []
            for c in caps:
                q.append(min(c, left))
                left -= q[-1]
            quota.append(q)
        return quota

    def __len__(self) -> int:
        return sum(self.quota[self.rank])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import webdataset as wds

        info = get_worker_info()
        worker = info.id if info else 0
        if info is None and self.workers > 1:  # read in the main process: yield every worker's share in turn
            yield from (s for w in range(self.workers) for s in self._worker_samples(w, wds))
            return
        yield from self._worker_samples(worker, wds)

    def _worker_samples(self, worker: int, wds):
        quota = self.quota[self.rank][worker]
        shards = self._shards(self.rank, worker)
        order = [shards[i] for i in np.random.default_rng([self.seed, self.epoch, self.rank, worker])
                 .permutation(len(shards))]
        pending: list[str] = []
        last = None
        done = 0
        for s in order:
            if done >= quota:
                break
            stream = wds.tarfile_to_samples()(iter([dict(url=self.urls[s])]))
            position = 0
            for sample in stream:
                field = next((k for k in sample if not k.startswith("__") and k.lower().rsplit(".", 1)[-1]
                              in IMAGE_EXTS), None)
                if field is None or (self.held and sample_id(self.urls[s], sample["__key__"]) in self.held):
                    continue
                sid = int(self.offsets[s]) + position
                position += 1
                record = _Bytes(sample[field], f"{self.urls[s]}:{sample['__key__']}")
                self.decoder.files = [record]
                try:
                    item = self.decoder.item(self.epoch, sid)
                except UsageError:  # undecodable: replaced by the next decodable sample
                    pending.append(str(record))
                    continue
                for copy in range(1 + len(pending)):
                    if done >= quota:
                        break
                    yield dict(item, bad=pending if copy == 0 else [])
                    done += 1
                pending, last = [], item
                if done >= quota:
                    break
        while done < quota and last is not None:  # undecodable samples at the very end
            yield dict(last, bad=pending)
            pending, done = [], done + 1
        if done < quota:
            raise UsageError(f"data: no decodable image in shards {[self.urls[s] for s in shards][:3]}")


class _Bytes:
    """An image held in memory (a WebDataset sample), decoded by `load_rgb` like a file."""

    def __init__(self, data: bytes, name: str):
        self.data, self.name = data, name

    def read_bytes(self) -> bytes:
        return self.data

    def __str__(self) -> str:
        return self.name


def shard_records(urls: list[str], limit: int = 0, only: set[str] | None = None) -> list[_Bytes]:
    """The first `limit` (0 = all) images of the shards (those in `only`, ids of `sample_id`, when given), in
    memory: a held-out set (`data.val_root`, or what `data.val_split` holds out of the training shards)."""
    import webdataset as wds

    out = []
    for sample in wds.tarfile_to_samples()(iter([dict(url=u) for u in urls])):
        if only is not None and sample_id(sample["__url__"], sample["__key__"]) not in only:
            continue
        field = next((k for k in sample if not k.startswith("__") and k.lower().rsplit(".", 1)[-1] in IMAGE_EXTS),
                     None)
        if field is not None:
            out.append(_Bytes(sample[field], f"{sample['__url__']}:{sample['__key__']}"))
            if limit and len(out) >= limit:
                break
    return out


# --------------------------------------------------------------------------------------------- what the loop reads

@dataclass
class Sources:
    """Training images (a file list, an `HFImages`, or shard URLs + counts), held-out images, unreadable files."""
    train: object
    val: object
    unreadable: list
    shard_counts: list[int] | None = None
    held: set[str] = frozenset()  # streamed samples `data.val_split` holds out (ids of `sample_id`)

    @property
    def streaming(self) -> bool:
        return self.shard_counts is not None


def _require(root_kind: str, root) -> None:
    module = {"hf": "datasets", "wds": "webdataset"}.get(root_kind)
    if module and importlib.util.find_spec(module) is None:
        raise UsageError(f"data {root} is read with {module}, which is not installed: pip install 'phreg[data]'")


def open_sources(data, seed: int) -> Sources:
    """Resolve `data.root`, `data.val_split` and `data.val_root` into what training and held-out scoring read."""
    from .scan import scan_images

    root_kind = kind(data.root)
    for root in (data.root, data.val_root):
        _require(kind(root) if root else "folder", root)
    unreadable: list = []
    counts, val = None, []
    if root_kind == "folder":
        train, unreadable = scan_images(data.root, "data.root")
        train, val = split_files(train, data.val_split, seed)
    elif root_kind == "hf":
        train = HFImages.open(str(data.root))
        train, val = train.split(data.val_split, seed) if data.val_split > 0 else (train, [])
    else:
        train = shard_urls(str(data.root))
        keys = [[sample_id(u, k) for k in sample_keys(u)] for u in train]
        if not sum(map(len, keys)):
            raise UsageError(f"data {data.root}: no image samples ({', '.join(IMAGE_EXTS)}) in {len(train)} shard(s)")
        held = held_out([i for shard in keys for i in shard], data.val_split, seed)
        counts = [sum(i not in held for i in shard) for shard in keys]
        if not sum(counts):
            raise UsageError(f"data.val_split={data.val_split} leaves no training sample in {data.root}")
        val = shard_records(train, data.val_limit, only=held) if held else []
    if data.val_root:
        val_kind = kind(data.val_root)
        if val_kind == "folder":
            val, val_unreadable = scan_images(data.val_root, "data.val_root")
            unreadable += val_unreadable
        elif val_kind == "hf":
            val = HFImages.open(str(data.val_root), prefer_split="validation")
        else:
            val = shard_records(shard_urls(str(data.val_root)), data.val_limit)
    return Sources(train, val, unreadable, counts, held if counts is not None else frozenset())


def fingerprint(files) -> object:
    """What identifies a training set for the target cache: file sizes and dates, or a dataset's fingerprint."""
    if hasattr(files, "fingerprint"):
        return files.fingerprint
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
