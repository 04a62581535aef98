"""`phreg inspect`: does this checkpoint need registers? Token norms, high-norm outliers, TTA noise, pictures."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config.recipe import ViewsCfg
from ..data.images import ImageDataset
from ..data.scan import scan_images
from ..errors import UsageError
from ..files.atomic import write_json
from ..models.specs import Loaded
from .analysis import Analysis, analyze, to_rgb
from .figures import norm_histogram, norm_range, panels, picture_names

SCHEMA = "phreg.inspect/1"
HISTOGRAM = "norm_histogram.png"


def load_images(root, loaded: Loaded, limit: int = 0) -> tuple[list[Path], torch.Tensor]:
    """Center crops at the model's resolution (short side resized first), in its normalization."""
    files, _ = scan_images(root)
    files = files[:limit] if limit else files
    return files, crops(files, loaded)


def crops(files: list[Path], loaded: Loaded) -> torch.Tensor:
    """(N, 3, S, S): each image's center crop at the model's resolution (short side resized first), normalized."""
    return ImageDataset(files, loaded.img_size, loaded.mean, loaded.std, train=False).images()


def shown_name(file: Path, root) -> str:
    """An image as a picture's title names it: its path under the images folder (its file name in a flat one)."""
    root = Path(root) if root is not None else None
    return str(file.relative_to(root)) if root is not None and file.is_relative_to(root) else file.name


def verdict(summary: dict) -> str:
    """One line: artifacts or not, and what to do. A model that already has registers (a distilled student, a
    `reg4` checkpoint) is not told to get them or that distillation could still help it: its line says what it has."""
    o, noise = summary["outliers"], summary["tta_noise"]["mean_1_minus_cos"]
    regs = summary.get("registers") or 0
    if o["rule"]["bimodal"]:
        advice = (f"They remain despite its {regs} register tokens." if regs else
                  "Registers recommended: phreg distill.")
        return (f"HIGH-NORM ARTIFACTS: {100 * o['fraction']:.1f}% of patch tokens above {o['threshold']:.0f} "
                f"(up to {o['max_over_median']:.1f}x the median) in {o['images_with_outliers']}/{summary['images']} "
                f"images; TTA noise {noise:.4f}. {advice}")
    tail = f"; it has {regs} register tokens" if regs else ": distillation can still denoise"
    return (f"no high-norm artifacts (patch norms unimodal, max {o['max_over_median']:.1f}x the median); "
            f"TTA noise {noise:.4f} (mean 1-cos of raw to own denoised features){tail}.")


def text_summary(s: dict) -> str:
    lines = [f"{s['model']}: {s['images']} images, grid {s['grid'][0]}x{s['grid'][1]}, {s['registers']} registers"
             + ("" if s["class_token"] else ", no class token (no CLS attention picture)")]
    lines.append(f"{'layer':<10}{'kind':<7}{'median':>9}{'p99':>9}{'max':>9}")
    for layer, kinds in s["norms"].items():
        for kind, st in kinds.items():
            lines.append(f"{layer:<10}{kind:<7}{st['median']:>9.1f}{st['p99']:>9.1f}{st['max']:>9.1f}")
    o = s["outliers"]
    lines.append(f"outliers ({o['layer']}): threshold {o['threshold']:.1f} ({'bimodal' if o['rule']['bimodal'] else 'unimodal'}"
                 f", Otsu cut {o['rule']['otsu_cut']:.1f}), fraction {o['fraction']:.4f}, "
                 f"Darcet >150: {o['darcet_150_fraction']:.4f}")
    if o["neighbour_cos_outliers"] is not None:
        lines.append(f"cosine to 4-neighbours: outliers {o['neighbour_cos_outliers']:.3f}, "
                     f"others {o['neighbour_cos_others']:.3f}")
    lines.append(f"verdict: {verdict(s)}")
    return "\n".join(lines)


def inspect_model(loaded: Loaded, images_dir, out: Path | None, views: int = 10, limit: int = 0, pictures: int = 8,
                  seed: int = 0, device="cpu") -> dict:
    start = time.perf_counter()
    files, images = load_images(images_dir, loaded, limit)
    a: Analysis = analyze(loaded, images, ViewsCfg(num=views), seed, pictures=pictures, device=device)
    s = a.summary()
    s.update(schema=SCHEMA, img_size=loaded.img_size, views=views, files=[str(f) for f in files],
             seconds=round(time.perf_counter() - start, 1))
    s["verdict"] = verdict(s)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        shared = norm_range(a.maps) if a.maps else None  # one colour range for every pictured image
        names = picture_names(files[:len(a.maps)], taken=(HISTOGRAM,))
        figures = [panels(to_rgb(images[i], loaded.mean, loaded.std), [(Path(a.name).name, m)], out / names[i],
                          shared, title=shown_name(files[i], images_dir)).name for i, m in enumerate(a.maps)]
        figures.append(norm_histogram([(a.name, a.norms[a.artifact_layer])], out / HISTOGRAM,
                                      s["outliers"]["threshold"]).name)
        s["figures"] = figures
        write_json(out / "inspect.json", s)
    return s
