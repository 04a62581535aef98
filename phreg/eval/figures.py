"""Pictures for inspect and eval: image | patch-norm map | PCA of patch features | CLS attention, norm histograms,
zero-shot label maps and depth-probe predictions (image | ground truth | teacher | student)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..files.atomic import write_atomic  # noqa: E402
from .tokens import pca_basis, pca_rgb  # noqa: E402


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def norm_range(maps: list[dict]) -> tuple[float, float]:
    """The colour range of patch-norm maps: their pooled 1st to 99th percentile. A range from 0 to the maximum makes
    norms of 40-60 one flat colour and lets a few artifact tokens set the scale; teacher and student (and every
    pictured image) share one range, so the same colour is the same norm everywhere."""
    values = np.concatenate([np.asarray(m["norm"], dtype=np.float64).ravel() for m in maps])
    lo, hi = np.percentile(values, [1, 99])
    return float(lo), float(max(hi, lo + 1e-6))


def picture_names(files: list[Path], prefix: str = "", taken: tuple[str, ...] = ()) -> list[str]:
    """A picture's file name per image, after the image: `{prefix}{stem}.png`, the stem kept to letters, digits, `-`,
    `_` and `.` (anything else becomes `_`), unique without regard to case (a second `a.jpg`, from another folder,
    is `a_2.png`) and never one of `taken` (the folder's other files)."""
    used = {t.lower() for t in taken}
    names = []
    for f in files:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(f).stem).strip(".") or "image"
        name, n = f"{prefix}{stem}.png", 1
        while name.lower() in used:
            n += 1
            name = f"{prefix}{stem}_{n}.png"
        used.add(name.lower())
        names.append(name)
    return names


def panels(image: np.ndarray, rows: list[tuple[str, dict]], path: Path,
           norms: tuple[float, float] | None = None, title: str | None = None) -> Path:
    """One row per model: image | patch-norm map (last block, pre-norm) | PCA-to-RGB | CLS attention, under `title`
    (the image's file name). Rows share the norm colour range (`norms`, default `norm_range` of these rows; the colour
    bar is clipped at both ends) and the first row's PCA basis, so teacher and student compare directly."""
    vmin, vmax = norms or norm_range([m for _, m in rows])
    basis = pca_basis(rows[0][1]["patches"])
    fig, axes = plt.subplots(len(rows), 4, figsize=(11, 2.9 * len(rows)), squeeze=False)
    for r, (label, m) in enumerate(rows):
        ax = axes[r]
        ax[0].imshow(image)
        ax[0].set_ylabel(label, fontsize=10)
        im = ax[1].imshow(m["norm"].numpy(), cmap="inferno", vmin=vmin, vmax=vmax)
        fig.colorbar(im, ax=ax[1], fraction=0.046, pad=0.02, extend="both")
        ax[2].imshow(pca_rgb(m["patches"], m["norm"].shape, basis).numpy(), interpolation="nearest")
        if m["attn"] is not None:
            ax[3].imshow(m["attn"].numpy(), cmap="viridis")
        else:
            ax[3].text(0.5, 0.5, "no class token:\nno CLS attention", ha="center", va="center", fontsize=9,
                       transform=ax[3].transAxes)
        for a, heading in zip(ax, ["image", "patch norm (last block)", "PCA of patch features", "CLS attention"]):
            a.set_xticks([])
            a.set_yticks([])
            if r == 0:
                a.set_title(heading, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def norm_histogram(series: list[tuple[str, dict]], path: Path, threshold: float | None = None) -> Path:
    """Histogram of last-block token norms per kind (log counts), one panel per model, with the outlier threshold."""
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 3.4), squeeze=False)
    top = max(float(v.max()) for _, kinds in series for v in kinds.values() if v.numel())
    bins = np.linspace(0, top * 1.02, 80)
    for ax, (label, kinds) in zip(axes[0], series):
        for kind, color in (("patch", "tab:blue"), ("cls", "tab:orange"), ("reg", "tab:green")):
            v = kinds.get(kind)
            if v is not None and v.numel():
                ax.hist(v.flatten().numpy(), bins=bins, color=color, alpha=0.6, label=f"{kind} ({v.numel()})")
        if threshold is not None and np.isfinite(threshold):
            ax.axvline(threshold, color="red", ls="--", lw=1, label=f"outlier threshold {threshold:.0f}")
        ax.set_yscale("log")
        ax.set_xlabel("token norm (last block, pre-norm)")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def zeroshot_figure(rgb: np.ndarray, truth: np.ndarray, teacher: np.ndarray, student: np.ndarray, palette: np.ndarray,
                    labels: tuple[str, str], path: Path, ignore_index: int | None = None, name: str = "image") -> Path:
    """image (titled `name`, its file name) | ground truth | teacher's labels | student's labels (ignored pixels black
    in the truth)."""
    from ..clip.segmenter import colorize

    truth = np.where(truth == ignore_index, len(palette), truth) if ignore_index is not None else truth
    fig, axes = plt.subplots(1, 4, figsize=(13, 2.9))
    for ax, img, title in zip(axes, [rgb, colorize(truth, palette), colorize(teacher, palette),
                                     colorize(student, palette)], [name, "ground truth", *labels]):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    return _save(fig, path)


def depth_figure(image: Path, depth: Path, scale: float, max_depth: float, predictions: list[tuple[str, np.ndarray]],
                 path: Path, name: str = "image") -> Path:
    """image (titled `name`, its file name) | ground-truth depth | each model's predicted depth, one colour scale in
    metres (pixels without a measurement black)."""
    from ..data.images import load_rgb
    from .inputs import read_depth

    truth = read_depth(depth, scale)
    top = float(min(max_depth, np.percentile(np.concatenate([truth[truth > 0]] + [p.ravel() for _, p in predictions]),
                                             99)))
    cmap = plt.get_cmap("magma_r").with_extremes(bad="black")
    fig, axes = plt.subplots(1, 2 + len(predictions), figsize=(3.4 * (2 + len(predictions)), 2.9))
    axes[0].imshow(load_rgb(image))
    axes[0].set_title(name, fontsize=10)
    for ax, (title, d) in zip(axes[1:], [("ground truth", np.ma.masked_where(truth <= 0, truth)), *predictions]):
        im = ax.imshow(d, cmap=cmap, vmin=0, vmax=top, interpolation="nearest")
        ax.set_title(title if title == "ground truth" else f"{title} (depth probe)", fontsize=10)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(im, ax=list(axes), fraction=0.02, pad=0.01, label="depth (m)")
    return _save(fig, path)


def neuron_panels(rows: list[tuple[np.ndarray, np.ndarray | None, np.ndarray]], path: Path, what: str,
                  layer: int, name: str = "image") -> Path:
    """Where register neurons fire: per image, image (titled `name`, its file name) | the neurons' summed |activation|
    over the patch grid | the patch-norm map of the block that decides outliers (pre-norm). `what` names the neurons
    (or says there are none)."""
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 2.9 * len(rows)), squeeze=False)
    for r, (image, act, norm) in enumerate(rows):
        ax = axes[r]
        ax[0].imshow(image)
        if act is not None:
            im = ax[1].imshow(act, cmap="magma", vmin=0)
            fig.colorbar(im, ax=ax[1], fraction=0.046, pad=0.02)
        else:
            ax[1].text(0.5, 0.5, "no register neurons", ha="center", va="center", fontsize=9,
                       transform=ax[1].transAxes)
        im = ax[2].imshow(norm, cmap="inferno", vmin=0)
        fig.colorbar(im, ax=ax[2], fraction=0.046, pad=0.02)
        for a, title in zip(ax, [name, f"register neurons: {what}", f"patch norm (block {layer}, pre-norm)"]):
            a.set_xticks([])
            a.set_yticks([])
            if r == 0:
                a.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
