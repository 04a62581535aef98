"""Zero-shot segmentation over a folder: `phreg segment`, and the segmenter and label maps that `phreg eval --classes`
scores (`phreg.eval.zeroshot`)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch

from ..data.images import load_rgb
from ..errors import UsageError
from ..files.atomic import atomic_dir, write_json
from .segmenter import Classes, Segmenter, overlay, query_embeddings


def segmenter(loaded, classes: Classes, text_tower, head: str, settings: dict, sigma: float = 5.0,
              device="cpu", queries: torch.Tensor | None = None) -> Segmenter:
    words, owner = classes.queries()
    if queries is None:
        queries = query_embeddings(text_tower.to(device), words)
    return Segmenter(loaded.model.to(device).eval(), queries, owner, classes.ids, head, sigma, **settings)


def segment_files(seg: Segmenter, files: list[Path], mean, std):
    """Yield (file, uint8 RGB, label map at the image's own size) per image."""
    for f in files:
        rgb = np.asarray(load_rgb(f))
        yield f, rgb, seg.predict(seg.prepare(rgb, mean, std), rgb.shape[:2]).numpy()


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def label_png(labels: np.ndarray) -> bytes:
    """Single-channel PNG of label values (8-bit, or 16-bit beyond 255 classes)."""
    return _png(labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16))


def segment_folder(loaded, files: list[Path], classes: Classes, text_tower, out: Path, head: str, settings: dict,
                   sigma: float = 5.0, device="cpu", say=print) -> dict:
    """`phreg segment`: OUT/labels/*.png (label values), OUT/overlays/*.png (colours over the image),
    OUT/classes.json. The folder appears whole when every image is done, or not at all."""
    seg = segmenter(loaded, classes, text_tower, head, settings, sigma, device)
    palette = classes.palette()
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        (tmp / "labels").mkdir()
        (tmp / "overlays").mkdir()
        for i, (f, rgb, pred) in enumerate(segment_files(seg, files, loaded.mean, loaded.std)):
            (tmp / "labels" / f"{f.stem}.png").write_bytes(label_png(pred))
            (tmp / "overlays" / f"{f.stem}.png").write_bytes(_png(overlay(rgb, pred, palette)))
            say(f"{i + 1}/{len(files)} {f.name}")
        summary = dict(model=loaded.name, head=head, images=len(files), text_model=text_tower.name, sigma=sigma,
                       classes=[dict(id=i, names=n, colour=list(c)) for i, n, c in
                                zip(classes.ids, classes.names, classes.colours)],
                       seconds=round(time.perf_counter() - start, 1), **settings)
        write_json(tmp / "classes.json", summary)
    return summary


def check_segment_out(out: Path) -> None:
    """Only a new folder or an earlier `phreg segment` output may be replaced."""
    ok = not out.exists() or (out.is_dir() and not out.is_symlink() and all(
        p.name in ("labels", "overlays", "classes.json") for p in out.iterdir()))
    if not ok:
        raise UsageError(f"--out {out} exists and is not an earlier `phreg segment` output; choose a new folder")
