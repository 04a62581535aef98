"""Which images a run trained on, by name and by content: `RUN/training_files.tsv`, and the overlap of any image list
with it.

A score measured on images the student trained on is not a held-out score. `distill` records its training images
(image folders: sha256, size and path relative to `data.root`, one line each; hashed in a thread pool at start, about
as long as reading the files once), and `eval` compares its own images with that record: by content (a copy under
another name is still a training image) and by file name (reported beside it: a same-named file with other content
was never trained on). Runs that stream a dataset or read a Hugging Face one record nothing, and their overlap is
reported as unknown. Torch-free.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..files.atomic import sha256_file, write_atomic

RECORD = "training_files.tsv"
HEADER = "# sha256\tbytes\tpath (relative to data.root): the images this run trained on\n"


def write_record(run: Path, files: list[Path], root: Path) -> Path:
    """RUN/training_files.tsv for `files` (the training images, after the held-out split), atomically."""
    with ThreadPoolExecutor(8) as pool:  # hashlib releases the GIL: reading and hashing overlap
        hashes = list(pool.map(sha256_file, files))
    lines = [f"{h}\t{f.stat().st_size}\t{f.relative_to(root) if f.is_relative_to(root) else f.name}\n"
             for h, f in zip(hashes, files)]
    return write_atomic(run / RECORD, HEADER + "".join(lines))


def read_record(run: Path | None) -> list[tuple[str, int, str]] | None:
    """(sha256, bytes, relative path) per training image, or None when the run recorded none (not a run, a dataset
    or stream run, or a run made before phreg recorded it)."""
    path = Path(run) / RECORD if run is not None else None
    if path is None or not path.is_file():
        return None
    rows = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            sha, size, rel = line.split("\t", 2)
            rows.append((sha, int(size), rel))
    return rows


def overlap(run: Path | None, files: list[Path]) -> dict:
    """Which of `files` the run trained on. `trained`: indices whose content (sha256) is a training image's; `by_name`:
    how many share a training image's file name; `unseen`: the indices never trained on. `recorded` False (and the
    lists None) when the run has no record."""
    record = read_record(run)
    if record is None:
        return dict(recorded=False, images=len(files), trained=None, unseen=None, by_name=None, by_content=None)
    sizes = {size for _, size, _ in record}
    hashes = {sha for sha, _, _ in record}
    names = {Path(rel).name for _, _, rel in record}
    maybe = [i for i, f in enumerate(files) if f.stat().st_size in sizes]  # only a file of a training size can match
    with ThreadPoolExecutor(8) as pool:
        content = {i for i, h in zip(maybe, pool.map(sha256_file, [files[i] for i in maybe])) if h in hashes}
    by_name = sum(f.name in names for f in files)
    trained = sorted(content)
    return dict(recorded=True, images=len(files), training_images=len(record), trained=trained,
                unseen=[i for i in range(len(files)) if i not in content], by_content=len(trained), by_name=by_name,
                same_name_other_content=sum(f.name in names and i not in content for i, f in enumerate(files)),
                record_sha256=hashlib.sha256((Path(run) / RECORD).read_bytes()).hexdigest())


def no_training(files: list[Path]) -> dict:
    """`overlap`'s answer for a compared model that was never trained (the teacher with test-time registers): no
    image is a training image."""
    return dict(recorded=True, untrained=True, images=len(files), training_images=0, trained=[],
                unseen=list(range(len(files))), by_content=0, by_name=0, same_name_other_content=0)


def overlap_line(o: dict) -> str:
    """The overlap in words, for the terminal and the card."""
    if o.get("untrained"):
        return "no training overlap: the compared model was not trained (test-time registers only)"
    if not o["recorded"]:
        return "training overlap unknown: the student's run recorded no training list"
    n, k = o["images"], o["by_content"]
    text = (f"{k} of the {n} images are in the run's training list ({o['training_images']} images) by content, "
            f"{o['by_name']} by file name")
    if o["same_name_other_content"]:
        text += f" ({o['same_name_other_content']} share a training file's name, not its content: never trained on)"
    return text
