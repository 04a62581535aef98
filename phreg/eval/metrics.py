"""One place per metric: what `phreg eval` measures, teacher vs student, and the summary rows each result reads as.

A metric is one function of the `Context` (both models, their analyses, the images, the options), registered with
`@metric`: it returns a `Measured` (what eval.json keeps under the metric's key, and its summary rows
{metric, label, teacher, student, better[, note]}), or None when it was not asked for (no masks, no classes).
`evaluate` measures stage by stage and lists the rows in the order the metrics are registered below: the order of
eval.json's `summary`, the terminal table, report.html and the model card, which only render rows (`phreg.tables`).

Adding a metric is one function here, decorated with `@metric("its_key")`, and its test.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..fastpath import eager_attention
from ..models import Loaded
from ..tables import HARDWARE_DEPENDENT
from .analysis import Analysis

if TYPE_CHECKING:
    from .evaluate import EvalOptions


@dataclass
class Context:
    """Everything a metric may read: both models, measured on the same images, crops, seeds and view plans."""
    teacher: Loaded
    student: Loaded
    files: list[Path]
    a_t: Analysis  # the teacher's analysis: token norms, outliers, its own TTA-denoised features
    a_s: Analysis
    s_t: dict  # `Analysis.summary()`: what eval.json keeps as teacher.inspect
    s_s: dict
    judged: dict  # the student's outliers under the teacher's threshold
    options: EvalOptions
    out: Path  # the eval folder (pictures go there)
    train: list[int] | None = None  # the probe's split (indices into `files`), when masks and classes are given
    val: list[int] | None = None
    unseen: list[int] | None = None  # images the student never trained on (`phreg.training_list`); None: unknown


@dataclass
class Measured:
    value: object  # kept in eval.json under the metric's key (nothing, for a metric without one)
    rows: list[dict]  # its summary rows, in order


@dataclass(frozen=True)
class Metric:
    key: str | None  # its entry in eval.json; None: it reads what the inspect summaries already hold
    stage: str  # when it is measured, timed as one of `STAGES`
    measure: Callable[[Context], Measured | None]


STAGES = ("distances and cost", "probe", "zero-shot")
METRICS: list[Metric] = []


def metric(key: str | None = None, stage: str = STAGES[0]):
    """Register a metric; its rows come after those of the metrics registered before it."""
    assert stage in STAGES, stage

    def register(fn: Callable[[Context], Measured | None]):
        METRICS.append(Metric(key, stage, fn))
        return fn
    return register


def row(metric: str, label: str, teacher, student, better: str | None, note: str | None = None) -> dict:
    """A summary row; `better`: 'lower', 'higher' or None (then `note` says why there is no verdict)."""
    out = dict(metric=metric, label=label, teacher=teacher, student=student, better=better)
    if note is not None:
        out["note"] = note
    return out


@metric("denoised_distance")
def denoised_distance(ctx: Context) -> Measured:
    """Mean 1 - cos to the teacher's TTA-denoised features: the number distillation optimizes. The headline row is
    measured on images the student never trained on (all images in a second row), or says in its label that it is
    not; and on the probe's val images alone, when there is a split."""
    tta = ctx.a_t.tta
    dist_s = tta.distances(ctx.student.model)
    d = dict(teacher=tta.teacher_distance, student=dist_s.mean().item(),
             per_image_teacher=tta.teacher_distances.tolist(), per_image_student=dist_s.tolist())
    label, n, unseen = "mean 1 - cos to TTA-denoised teacher features", len(ctx.files), ctx.unseen
    if unseen is None:  # not a phreg run, or one that recorded no training list
        rows = [row("denoised_distance", f"{label} ({n} images; training overlap unknown)", d["teacher"],
                    d["student"], "lower")]
    elif len(unseen) == n:
        rows = [row("denoised_distance", f"{label} ({n} images, none trained on)", d["teacher"], d["student"],
                    "lower")]
    elif not unseen:
        rows = [row("denoised_distance", f"{label} (all {n} images were trained on: not a held-out score)",
                    d["teacher"], d["student"], "lower")]
    else:  # the headline on never-trained images; all images beside it, saying how many were trained on
        d.update(unseen_images=len(unseen), unseen_teacher=tta.teacher_distances[unseen].mean().item(),
                 unseen_student=dist_s[unseen].mean().item())
        rows = [row("denoised_distance", f"{label} ({len(unseen)} never-trained image{'s' * (len(unseen) != 1)})", d["unseen_teacher"],
                    d["unseen_student"], "lower"),
                row("denoised_distance_all", f"  same, all {n} images ({n - len(unseen)} of them trained on)",
                    d["teacher"], d["student"], "lower")]
    if ctx.val is not None:
        d.update(val_images=len(ctx.val), val_teacher=tta.teacher_distances[ctx.val].mean().item(),
                 val_student=dist_s[ctx.val].mean().item())
        rows.append(row("denoised_distance_val", f"  same, val images only ({len(ctx.val)})", d["val_teacher"],
                        d["val_student"], "lower"))
    return Measured(d, rows)


@metric()
def tta_noise(ctx: Context) -> Measured:
    """Each model's distance to its own TTA-denoised features (position-tied noise)."""
    return Measured(None, [row("tta_noise", "own TTA noise (mean 1 - cos, raw vs own denoised)",
                               ctx.s_t["tta_noise"]["mean_1_minus_cos"], ctx.s_s["tta_noise"]["mean_1_minus_cos"],
                               "lower")])


@metric()
def outlier_fraction(ctx: Context) -> Measured:
    """High-norm patch tokens, the student judged by the teacher's own data-derived threshold."""
    thr = ctx.s_t["outliers"]["threshold"]
    label = (("high-norm patch tokens (teacher's threshold %.0f)" % thr) if thr != float("inf")
             else "high-norm patch tokens (own rule; teacher has none)")
    return Measured(None, [row("outlier_fraction", label, ctx.s_t["outliers"]["fraction"], ctx.judged["fraction"],
                               "lower")])


@metric()
def max_norm_ratio(ctx: Context) -> Measured:
    return Measured(None, [row("max_norm_ratio", "max / median patch norm, last block",
                               ctx.s_t["outliers"]["max_over_median"], ctx.s_s["outliers"]["max_over_median"],
                               "lower")])


@metric("high_norm_mass")
def high_norm_mass(ctx: Context) -> Measured:
    """Where the high norms live: per token kind, the mean norm and the share of the summed squared norm (report
    only: no summary row)."""
    threshold = ctx.s_t["outliers"]["threshold"]

    def shares(a: Analysis) -> dict:
        kinds = a.norms[a.artifact_layer]
        sq = {k: float((v.float() ** 2).sum()) for k, v in kinds.items() if v.numel()}
        total = sum(sq.values())
        return {k: dict(mean_norm=float(kinds[k].float().mean()), squared_norm_share=sq[k] / total,
                        above_teacher_threshold=float((kinds[k] > threshold).float().mean()))
                for k in sq}
    return Measured(dict(layer=ctx.a_t.artifact_layer, teacher=shares(ctx.a_t), student=shares(ctx.a_s)), [])


CLS_COSINE_NOTE = "1 is the teacher's by definition; no verdict"


@metric("cls_cosine")
def cls_cosine(ctx: Context) -> Measured:
    """Cosine of the two final class tokens; None (and no row) for a model without one (SigLIP). No verdict: the
    teacher's cosine to itself is 1 by definition, so judging the row would paint every student red."""
    t, s = ctx.a_t.cls_final, ctx.a_s.cls_final
    if t is None or s is None:
        return Measured(None, [])
    cos = torch.nn.functional.cosine_similarity(t, s, dim=-1).mean().item()
    return Measured(cos, [row("cls_cosine", "CLS token cosine to the teacher's", 1.0, cos, None,
                              note=CLS_COSINE_NOTE)])



@metric("probe", stage="probe")
def probe(ctx: Context) -> Measured | None:
    """The dense linear probe (`probe.py`), when masks and their class count are given."""
    if ctx.val is None:
        return None
    from .probe import evaluate_probe

    o = ctx.options
    p = evaluate_probe(ctx.teacher, ctx.student, ctx.files, o.masks, o.num_classes, o.ignore_index, ctx.train,
                       ctx.val, o.device)
    trained = len(set(ctx.val) - set(ctx.unseen)) if ctx.unseen is not None else 0  # the split's, not ours
    also = f", {trained} of them trained on by the student" if trained else ""
    return Measured(p, [
        row("miou", f"linear-probe mIoU ({p['val_images']} val images{also})", p["teacher"]["miou"],
            p["student"]["miou"], "higher"),
        row("pixel_accuracy", "linear-probe pixel accuracy", p["teacher"]["pixel_accuracy"],
            p["student"]["pixel_accuracy"], "higher")])


@metric("zeroshot", stage="zero-shot")
def zeroshot(ctx: Context) -> Measured | None:
    """Zero-shot segmentation (`zeroshot.py`), when classes are given (CLIP family; needs masks)."""
    o = ctx.options
    if o.zeroshot is None:
        return None
    from .probe import load_masks
    from .zeroshot import evaluate_zeroshot

    gt = load_masks(ctx.files, o.masks, o.zeroshot.classes.num_labels, o.ignore_index)
    z = evaluate_zeroshot(ctx.teacher, ctx.student, ctx.files, gt, o.zeroshot, o.ignore_index, ctx.out,
                          min(o.pictures, 4), o.device)
    return Measured(z, [row("zeroshot_miou", f"zero-shot mIoU ({z['images']} images; teacher {z['teacher']['head']}, "
                                             f"student {z['student']['head']})",
                            z["teacher"]["miou"], z["student"]["miou"], "higher")])


@metric("cost")
def cost(ctx: Context) -> Measured:
    """Parameters, forward FLOPs per image and images/s of each model (the last: a speed, not a verdict)."""
    c = dict(teacher=model_cost(ctx.teacher, ctx.options.device), student=model_cost(ctx.student, ctx.options.device))
    return Measured(c, [
        row("gflops", "forward GFLOPs per image", c["teacher"]["gflops"], c["student"]["gflops"], "lower"),
        # measured once on whatever machine ran eval, next to other work: a speed, not a verdict
        row("images_per_s", f"images/s (batch {c['teacher']['batch']}, this machine)", c["teacher"]["images_per_s"],
            c["student"]["images_per_s"], None, note=HARDWARE_DEPENDENT)])


def model_cost(loaded: Loaded, device, batch: int = 8, repeats: int = 3) -> dict:
    """Parameters, forward FLOPs per image (attention counted through timm's eager path) and images/s."""
    model = loaded.model.to(device).eval()
    x = torch.randn(1, 3, loaded.img_size, loaded.img_size, device=device)
    # the CPU SDPA kernel is invisible to the FLOP counter; eager attention is the same math
    with eager_attention(model), FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_features(x)
    xb = x.expand(batch, -1, -1, -1).contiguous()
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            model.forward_features(xb)
            if device != "cpu" and torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return dict(params=sum(p.numel() for p in model.parameters()), gflops=counter.get_total_flops() / 1e9,
                images_per_s=batch / statistics.median(times[1:]), batch=batch)
