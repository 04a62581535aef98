"""Zero-shot segmentation scored, teacher vs student (`phreg eval --classes`): the same images, class queries and
windows for both, each read through its own dense head.

The segmenting itself (class files, the text tower, `Segmenter`, label colours) is `phreg.clip`'s, shared with
`phreg segment`; what is scored and how (one confusion matrix, `segmentation.scores`) is eval's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..clip.segment import segment_files, segmenter
from ..clip.segmenter import Classes, query_embeddings
from ..data.images import load_rgb
from .figures import picture_names, zeroshot_figure
from .segmentation import confusion, scores


@dataclass(frozen=True)
class ZeroShot:
    """What `phreg eval --classes` segments with: the classes, CLIP's text tower (`phreg.clip.text.TextTower`), the
    window settings (`phreg.clip.segmenter.DEFAULTS`' keys), the NACLIP sigma and the (teacher, student) dense heads."""
    classes: Classes
    text_tower: object
    settings: dict
    sigma: float = 5.0
    heads: tuple[str, str] = ("naclip", "maskclip")


@torch.no_grad()
def evaluate_zeroshot(teacher, student, files: list[Path], masks: list[torch.Tensor], zs: ZeroShot,
                      ignore_index: int | None = None, out: Path | None = None, pictures: int = 4,
                      device="cpu") -> dict:
    """Teacher (default: NACLIP head) and student (MaskCLIP head) on the same images and class queries: mIoU,
    per-class IoU, pixel accuracy; pictures image | ground truth | teacher | student for the first `pictures` images."""
    start = time.perf_counter()
    classes, heads = zs.classes, zs.heads
    words, _ = classes.queries()
    queries = query_embeddings(zs.text_tower.to(device), words)
    K = classes.num_labels
    result = dict(images=len(files), classes=[classes.title(i) for i in range(len(classes.ids))], ids=classes.ids,
                  synonyms=len(words),
                  ignore_index=ignore_index, text_model=zs.text_tower.name, sigma=zs.sigma, **zs.settings)
    shown: dict[str, list[np.ndarray]] = {}
    for role, loaded, head in (("teacher", teacher, heads[0]), ("student", student, heads[1])):
        seg = segmenter(loaded, classes, zs.text_tower, head, zs.settings, zs.sigma, device, queries)
        cm = torch.zeros(K, K, dtype=torch.long)
        shown[role] = []
        for i, (_, _, pred) in enumerate(segment_files(seg, files, loaded.mean, loaded.std)):
            cm += confusion(torch.from_numpy(pred), masks[i], K, ignore_index)
            if i < pictures:
                shown[role].append(pred)
        s = scores(cm)
        per_class = {classes.title(k): s["per_class_iou"][i] for k, i in enumerate(classes.ids)}
        result[role] = dict(head=head, miou=s["miou"], pixel_accuracy=s["pixel_accuracy"], per_class_iou=per_class)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["figures"] = []
    if out is not None:
        palette = classes.palette()
        names = picture_names(files[:pictures], "zeroshot_")
        for i in range(min(pictures, len(files))):
            path = out / names[i]
            zeroshot_figure(np.asarray(load_rgb(files[i])), masks[i].numpy(), shown["teacher"][i],
                            shown["student"][i], palette, (f"teacher ({heads[0]})", f"student ({heads[1]})"), path,
                            ignore_index, name=Path(files[i]).name)
            result["figures"].append(path.name)
    return result
