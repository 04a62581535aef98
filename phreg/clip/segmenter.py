"""Zero-shot open-vocabulary segmentation, as NACLIP and PH-Reg evaluate CLIP.

Classes come from a class file (below). Each class name (and each synonym) is embedded with the 80 ImageNet prompt
templates: every prompt's embedding normalized, averaged, renormalized. An image is resized so its short side is
`short_side`, then read in `crop` x `crop` windows every `stride` pixels (the last window is shifted back inside the
image); each window's dense features (`phreg.dense_features`, e.g. the NACLIP or MaskCLIP head) are normalized and scored
against every query by cosine similarity, upsampled bilinearly to the window, summed and divided by how many windows
saw each pixel. The logits are upsampled to the image's own size, `softmax(logit_scale * logits)` over all queries,
the max over each class's synonyms gives the class probability; the prediction is the argmax, and pixels whose best
probability is below `background_threshold` go to the first class (the background, when it is first).
`crop=0` reads the whole resized image in one pass.

Class files:
* CSV with a header: a `name` column (synonyms separated by `;`), optional `id` (the label value in the masks;
  default: the row number) and a colour column `rgb` / `color` / `colour` ("r g b" or "#rrggbb"). CamVid's
  `classes.csv` (id,name,rgb) works as is.
* Plain text (NACLIP's `cls_*.txt`): line i is class i, synonyms separated by commas.
A class whose id is the ignore index (e.g. CamVid's 11, "Unlabelled") is not queried.
"""

from __future__ import annotations

import copy
import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError

DEFAULTS = dict(short_side=448, crop=336, stride=112, logit_scale=40.0, background_threshold=0.0)


@dataclass
class Classes:
    ids: list[int]  # label value of each class
    names: list[list[str]]  # synonyms per class, each queried; the first is the class's name unless `titles` says
    colours: list[tuple[int, int, int]]
    titles: dict[int, str] = field(default_factory=dict)  # label value -> name, where it is none of the queries

    def title(self, i: int) -> str:
        """The name of the class at position `i` (VOC's background is queried as stuff words: sky, wall, ...)."""
        return self.titles.get(self.ids[i], self.names[i][0])

    @property
    def num_labels(self) -> int:
        """Size of a confusion matrix indexed by label value."""
        return max(self.ids) + 1

    def queries(self) -> tuple[list[str], torch.Tensor]:
        """Every synonym once, and the class (position in `ids`) each belongs to."""
        words = [w for names in self.names for w in names]
        owner = torch.tensor([i for i, names in enumerate(self.names) for _ in names])
        return words, owner

    def palette(self) -> np.ndarray:
        """(num_labels, 3) uint8 colours indexed by label value (unlisted values black)."""
        out = np.zeros((max(self.num_labels, 1), 3), np.uint8)
        for i, c in zip(self.ids, self.colours):
            out[i] = c
        return out


def _colour(text: str, where: str) -> tuple[int, int, int]:
    text = text.strip()
    try:
        if text.startswith("#") and len(text) == 7:
            return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))
        rgb = tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise UsageError(f"{where}: colour {text!r} is not 'r g b' (0-255) or #rrggbb")
    return rgb


def _default_colour(i: int) -> tuple[int, int, int]:
    """A fixed, well-spread colour per class (golden-angle hues)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def read_classes(path: str | Path, ignore_index: int | None = None) -> Classes:
    """A class file (see the module docstring); a class with id `ignore_index` is left out."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--classes {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--classes {path} is not a readable text file: {e}") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise UsageError(f"--classes {path} is empty")
    rows: list[tuple[int, list[str], tuple | None]] = []
    header = [h.strip().lower() for h in next(csv.reader([lines[0]]))]
    if path.suffix.lower() == ".csv" or "name" in header:
        if "name" not in header:
            raise UsageError(f"--classes {path}: a CSV class file needs a 'name' column (got {', '.join(header)})")
        colour_key = next((k for k in ("rgb", "color", "colour") if k in header), None)
        for n, row in enumerate(csv.DictReader(lines), start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            where = f"--classes {path} line {n}"
            try:
                cid = int(row["id"]) if row.get("id") else len(rows)
            except ValueError:
                raise UsageError(f"{where}: id {row['id']!r} is not an integer") from None
            names = [w.strip() for w in row["name"].replace(";", ",").split(",") if w.strip()]
            colour = _colour(row[colour_key], where) if colour_key and row.get(colour_key) else None
            rows.append((cid, names, colour))
    else:
        rows = naclip_rows(lines)
    for cid, names, _ in rows:
        if not names:
            raise UsageError(f"--classes {path}: class {cid} has no name")
        if cid < 0:
            raise UsageError(f"--classes {path}: class id {cid} is negative")
    ids = [r[0] for r in rows]
    if len(set(ids)) != len(ids):
        raise UsageError(f"--classes {path}: class ids repeat ({sorted(i for i in set(ids) if ids.count(i) > 1)[0]})")
    rows = [r for r in rows if r[0] != ignore_index]
    if not rows:
        raise UsageError(f"--classes {path}: no class left to query (ignore index {ignore_index})")
    return Classes([r[0] for r in rows], [r[1] for r in rows],
                   [r[2] if r[2] is not None else _default_colour(r[0]) for r in rows])


def naclip_rows(lines) -> list[tuple[int, list[str], None]]:
    """NACLIP's class format: line i is class i, synonyms separated by commas."""
    return [(i, [w.strip() for w in ln.split(",") if w.strip()], None) for i, ln in enumerate(lines)]


def dataset_classes(lines: tuple[str, ...], titles: dict[int, str] | None = None) -> Classes:
    """A benchmark layout's classes (`phreg.eval.datasets.LAYOUTS`: NACLIP's strings) as `Classes`."""
    rows = naclip_rows(lines)
    return Classes([r[0] for r in rows], [r[1] for r in rows], [_default_colour(r[0]) for r in rows],
                   dict(titles or {}))


def templates() -> tuple:
    """The 80 ImageNet prompt templates of OpenAI's CLIP (as open_clip ships them)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return OPENAI_IMAGENET_TEMPLATES


@torch.no_grad()
def query_embeddings(text_tower, words: list[str]) -> torch.Tensor:
    """(Q, D): per word, the 80 prompts' normalized embeddings averaged and renormalized."""
    temps = templates()
    emb = text_tower.encode([t(w) for w in words for t in temps])
    return F.normalize(emb.view(len(words), len(temps), -1).mean(1), dim=-1)


def resized_size(h: int, w: int, short_side: int, multiple: int = 1) -> tuple[int, int]:
    """Short side to `short_side`, aspect kept (rounded to `multiple`, for whole-image passes)."""
    s = short_side / min(h, w)
    return max(multiple, round(h * s / multiple) * multiple), max(multiple, round(w * s / multiple) * multiple)


def windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of the sliding windows (mmseg / NACLIP: the last window is shifted back inside)."""
    def starts(n: int) -> list[int]:
        count = max(n - crop + stride - 1, 0) // stride + 1
        return sorted({max(min(i * stride + crop, n) - crop, 0) for i in range(count)})
    return [(y, x) for y in starts(h) for x in starts(w)]


class Segmenter:
    """A model, a dense head and class queries -> label maps. One forward per batch of windows."""

    def __init__(self, model, queries: torch.Tensor, owner: torch.Tensor, ids: list[int], head: str = "maskclip",
                 sigma: float = 5.0, short_side: int = 448, crop: int = 336, stride: int = 112,
                 logit_scale: float = 40.0, background_threshold: float = 0.0, batch_size: int = 8):
        from ..backbones import backbone

        self.model, self.head, self.sigma = model, head, sigma
        self.patch = backbone(model).patch_size
        why = (f"must be <= short side {short_side}, stride >= 1" if crop > short_side or stride < 1 else
               f"must be a multiple of the model's {self.patch}-px patches" if crop % self.patch else None)
        if crop and why:
            raise UsageError(f"zero-shot window: crop {crop} {why}")
        self.queries, self.owner, self.ids = F.normalize(queries.float(), dim=-1), owner, torch.tensor(ids)
        self.short_side, self.crop, self.stride = short_side, crop, stride
        self.logit_scale, self.threshold, self.batch_size = logit_scale, background_threshold, batch_size
        self._sized: dict[tuple[int, int], torch.nn.Module] = {}

    def model_at(self, size: tuple[int, int]):
        """The model at input `size`: timm's `set_input_size` on a copy that shares every parameter with the original
        but the positional embedding it resamples (buffers, e.g. RoPE tables, are the copy's own: they are rebuilt)."""
        from ..backbones import backbone

        if tuple(backbone(self.model).grid) == (size[0] // self.patch, size[1] // self.patch):
            return self.model
        if size not in self._sized:
            shared = {id(p): p for n, p in self.model.named_parameters() if not n.endswith("pos_embed")}
            model = copy.deepcopy(self.model, memo=shared)  # a new module tree around the same weights
            model.set_input_size(img_size=size)  # assigns a new pos_embed; never writes into a shared tensor
            self._sized[size] = model
        return self._sized[size]

    @torch.no_grad()
    def crop_logits(self, crops: torch.Tensor) -> torch.Tensor:
        """(n, 3, h, w) normalized crops -> (n, Q, h, w) cosine logits."""
        from ..backbones import dense_features

        model = self.model_at(tuple(crops.shape[-2:]))
        device = next(model.parameters()).device
        out = []
        for x in crops.split(self.batch_size):
            f = F.normalize(dense_features(model, x.to(device), self.head, self.sigma).float(), dim=-1)
            logits = (f @ self.queries.to(f.device).T).permute(0, 3, 1, 2)
            out.append(F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) normalized image at its working size -> (Q, H, W) logits, windows averaged."""
        _, h, w = image.shape
        if not self.crop:
            return self.crop_logits(image[None])[0]
        corners = windows(h, w, self.crop, self.stride)
        crops = torch.stack([image[:, y:y + self.crop, x:x + self.crop] for y, x in corners])
        per_crop = self.crop_logits(crops)
        total = torch.zeros(len(self.queries), h, w)
        count = torch.zeros(1, h, w)
        for (y, x), logit in zip(corners, per_crop):
            total[:, y:y + self.crop, x:x + self.crop] += logit
            count[:, y:y + self.crop, x:x + self.crop] += 1
        return total / count

    def prepare(self, rgb: np.ndarray, mean, std) -> torch.Tensor:
        """uint8 (H, W, 3) -> normalized (3, h, w) at the working size (short side resized, bilinear)."""
        from PIL import Image

        h, w = rgb.shape[:2]
        size = resized_size(h, w, self.short_side, 1 if self.crop else self.patch)
        img = Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
        return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)

    @torch.no_grad()
    def predict(self, image: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Normalized (3, h, w) -> (H, W) label values at `out_size` (the original image's size)."""
        logits = F.interpolate(self.logits(image)[None], size=out_size, mode="bilinear", align_corners=False)[0]
        probs = torch.softmax(logits * self.logit_scale, dim=0)
        per_class = torch.full((len(self.ids), *out_size), -1.0).scatter_reduce(
            0, self.owner.view(-1, 1, 1).expand_as(probs), probs, reduce="amax")
        best, label = per_class.max(0)
        label[best < self.threshold] = 0  # the first class: the background, where the class file puts one first
        return self.ids[label]


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Label values -> RGB (values outside the palette black)."""
    safe = np.where(labels < len(palette), labels, 0)
    out = palette[safe]
    out[labels >= len(palette)] = 0
    return out


def overlay(rgb: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (rgb * (1 - alpha) + colorize(labels, palette) * alpha + 0.5).astype(np.uint8)
