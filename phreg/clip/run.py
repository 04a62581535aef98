"""Zero-shot segmentation over a folder: `phreg eval --classes` (teacher vs student, scored) and `phreg segment`."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch

from ..data import load_rgb
from ..errors import UsageError
from ..files import atomic_dir, write_atomic, write_json
from .zeroshot import Classes, Segmenter, confusion, colorize, overlay, query_embeddings


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


@torch.no_grad()
def evaluate_zeroshot(teacher, student, files: list[Path], masks: list[torch.Tensor], classes: Classes, text_tower,
                      settings: dict, heads: tuple[str, str] = ("naclip", "maskclip"), sigma: float = 5.0,
                      ignore_index: int | None = None, out: Path | None = None, pictures: int = 4,
                      device="cpu") -> dict:
    """Teacher (NACLIP head) and student (MaskCLIP head) on the same images and class queries: mIoU, per-class IoU,
    pixel accuracy; pictures image | ground truth | teacher | student for the first `pictures` images."""
    from ..eval.probe import scores

    start = time.perf_counter()
    words, _ = classes.queries()
    queries = query_embeddings(text_tower.to(device), words)
    K = classes.num_labels
    result = dict(images=len(files), classes=[n[0] for n in classes.names], ids=classes.ids, synonyms=len(words),
                  ignore_index=ignore_index, text_model=text_tower.name, sigma=sigma, **settings)
    shown: dict[str, list[np.ndarray]] = {}
    for role, loaded, head in (("teacher", teacher, heads[0]), ("student", student, heads[1])):
        seg = segmenter(loaded, classes, text_tower, head, settings, sigma, device, queries)
        cm = torch.zeros(K, K, dtype=torch.long)
        shown[role] = []
        for i, (_, _, pred) in enumerate(segment_files(seg, files, loaded.mean, loaded.std)):
            cm += confusion(torch.from_numpy(pred), masks[i], K, ignore_index)
            if i < pictures:
                shown[role].append(pred)
        s = scores(cm)
        per_class = {n[0]: s["per_class_iou"][i] for i, n in zip(classes.ids, classes.names)}
        result[role] = dict(head=head, miou=s["miou"], pixel_accuracy=s["pixel_accuracy"], per_class_iou=per_class)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["figures"] = []
    if out is not None:
        palette = classes.palette()
        for i in range(min(pictures, len(files))):
            truth = masks[i].numpy()
            path = out / f"zeroshot_{i}.png"
            zeroshot_figure(np.asarray(load_rgb(files[i])), truth, shown["teacher"][i], shown["student"][i], palette,
                            (f"teacher ({heads[0]})", f"student ({heads[1]})"), path, ignore_index)
            result["figures"].append(path.name)
    return result


def zeroshot_figure(rgb, truth, teacher, student, palette, labels, path: Path, ignore_index=None) -> Path:
    """image | ground truth | teacher's labels | student's labels (ignored pixels black in the truth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = np.where(truth == ignore_index, len(palette), truth) if ignore_index is not None else truth
    fig, axes = plt.subplots(1, 4, figsize=(13, 2.9))
    for ax, img, title in zip(axes, [rgb, colorize(truth, palette), colorize(teacher, palette),
                                     colorize(student, palette)], ["image", "ground truth", *labels]):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


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


def check_out(out: Path) -> None:
    """Only a new folder or an earlier `phreg segment` output may be replaced."""
    ok = not out.exists() or (out.is_dir() and not out.is_symlink() and all(
        p.name in ("labels", "overlays", "classes.json") for p in out.iterdir()))
    if not ok:
        raise UsageError(f"--out {out} exists and is not an earlier `phreg segment` output; choose a new folder")
