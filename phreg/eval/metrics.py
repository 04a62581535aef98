"""One place per metric: what `phreg eval` measures, teacher vs student, and the summary rows each result reads as.

A metric is one function of the `Context` (both models, their analyses, the images, the options), registered with
`@metric`: it returns a `Measured` (what eval.json keeps under the metric's key, and its summary rows
{metric, label, teacher, student, better, images, trained_images[, note]}), or None when it was not asked for (no
masks, no classes). Each row says which images it is measured on (`row(..., on=ctx.images(indices))`): how many, and
how many of them the student trained on, which its label says when some were (`Images.note`).
`evaluate` measures stage by stage and lists the rows in the order of `METRICS`, at the end: the order of eval.json's
`summary`, the terminal table, report.html and the model card, which only render rows (`phreg.eval.tables`).

Adding a metric is one function here, decorated with `@metric("its_key")`, its place in `METRICS`, and its test.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..backbones.attention import eager_attention
from ..models.specs import Loaded
from .analysis import Analysis
from .datasets import PROBE_STEPS, EvalSet
from .tables import HARDWARE_DEPENDENT

if TYPE_CHECKING:
    from .zeroshot import ZeroShot


@dataclass(frozen=True)
class EvalOptions:
    """How `evaluate` measures: everything but the two models, the images and the output folder (here, beside the
    `Context` that hands it to every metric; `evaluate` imports it from here)."""
    views: int = 10  # TTA views of the denoised features
    limit: int = 0  # at most this many images of a folder (sorted by path); 0: all
    pictures: int = 8  # comparison pictures for the first N images
    seed: int = 0  # seed of the view plans
    probe_steps: int = PROBE_STEPS  # training steps of the segmentation and depth probes
    device: str = "cpu"
    zeroshot: ZeroShot | None = None  # zero-shot segmentation (needs masks)
    untrained: bool = False  # the "student" was never trained (the teacher with test-time registers)
    memo: dict = field(default_factory=dict, compare=False, repr=False)  # probe results per model, for every column


@dataclass
class Context:
    """Everything a metric may read: both models, measured on the same images, crops, seeds and view plans."""
    teacher: Loaded
    student: Loaded
    files: list[Path]  # the images the artifact metrics run on (`data.analysed`)
    a_t: Analysis  # the teacher's analysis: token norms, outliers, its own TTA-denoised features
    a_s: Analysis
    s_t: dict  # `Analysis.summary()`: what eval.json keeps as teacher.inspect
    s_s: dict
    judged: dict  # the student's outliers under the teacher's threshold
    options: EvalOptions
    out: Path  # the eval folder (pictures go there)
    data: EvalSet | None = None  # every image with its labels and split: what the probes and zero-shot read
    train: list[int] | None = None  # the probes' split as indices into `files`, when both are among them
    val: list[int] | None = None
    unseen: list[int] | None = None  # images the student never trained on (`phreg.run.training_list`); None: unknown

    def images(self, indices: list[int] | None = None) -> "Images":
        """The images at `indices` (all, by default) as a row is measured on them: how many, how many trained on."""
        idx = range(len(self.files)) if indices is None else indices
        if self.unseen is None:
            return Images(len(idx), None)
        unseen = set(self.unseen)
        return Images(len(idx), sum(i not in unseen for i in idx))

    def headline(self) -> list[int]:
        """The images the headline distance is scored on: the never-trained ones when only some are, else all."""
        n, unseen = len(self.files), self.unseen
        return list(unseen) if unseen is not None and 0 < len(unseen) < n else list(range(n))


    def val_images(self) -> "Images":
        """The probes' val images (`data.val`, all among `files`) as their rows are measured on them: how many, how
        many of them the student trained on."""
        at = {f: i for i, f in enumerate(self.files)}
        return self.images([at[self.data.files[j]] for j in self.data.val])

    def both(self, task: str, score) -> dict:
        """`score(loaded, role)` for the teacher and the student; a model measured before in this eval (the teacher,
        for every extra column) is not measured again."""
        memo = self.options.memo
        out = {}
        for role, loaded in (("teacher", self.teacher), ("student", self.student)):
            key = (task, id(loaded.model))
            if key not in memo:
                memo[key] = score(loaded, role)
            out[role] = memo[key]
        return out


@dataclass(frozen=True)
class Images:
    """What a summary row is measured on: `count` images (None: not on the images at all, e.g. the cost), `trained`
    of them in the student's training set (None: not known). Rows carry both (`images`, `trained_images`): only a row
    with no trained image is held-out evidence, and only such a row gets a verdict mark in the report and the card
    (`phreg.eval.tables.held_out`)."""
    count: int | None
    trained: int | None

    def note(self) -> str:
        """What a label that does not say it adds: ` [67 images, 50 trained on]` when some were trained on."""
        return f" [{self.count} images, {self.trained} trained on]" if self.trained else ""


NOT_ON_IMAGES = Images(None, 0)  # a property of the model (parameters, FLOPs, speed): no image was trained on


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


def metric(key: str | None = None, stage: str = STAGES[0]):
    """Mark a function of the `Context` as a metric: its eval.json key and the stage it is measured (and timed) in.
    `METRICS`, at the end of this module, lists them in the order of their rows."""
    assert stage in STAGES, stage

    def mark(fn: Callable[[Context], Measured | None]):
        fn.metric = Metric(key, stage, fn)
        return fn
    return mark


def row(metric: str, label: str, teacher, student, better: str | None, note: str | None = None,
        on: Images | None = None) -> dict:
    """A summary row; `better`: 'lower', 'higher' or None (then `note` says why there is no verdict); `on`: the images
    it is measured on (`Context.images`; unknown when not given: the row gets no verdict mark)."""
    on = on or Images(None, None)
    out = dict(metric=metric, label=label, teacher=teacher, student=student, better=better, images=on.count,
               trained_images=on.trained)
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
    label, n, unseen, everything = "mean 1 - cos to TTA-denoised teacher features", len(ctx.files), ctx.unseen, \
        ctx.images()
    if unseen is None:  # not a phreg run, or one that recorded no training list
        rows = [row("denoised_distance", f"{label} ({n} images; training overlap unknown)", d["teacher"],
                    d["student"], "lower", on=everything)]
    elif len(unseen) == n:
        rows = [row("denoised_distance", f"{label} ({n} images, none trained on)", d["teacher"], d["student"],
                    "lower", on=everything)]
    elif not unseen:
        rows = [row("denoised_distance", f"{label} (all {n} images were trained on: not a held-out score)",
                    d["teacher"], d["student"], "lower", on=everything)]
    else:  # the headline on never-trained images; all images beside it, saying how many were trained on
        d.update(unseen_images=len(unseen), unseen_teacher=tta.teacher_distances[unseen].mean().item(),
                 unseen_student=dist_s[unseen].mean().item())
        rows = [row("denoised_distance", f"{label} ({len(unseen)} never-trained image{'s' * (len(unseen) != 1)})",
                    d["unseen_teacher"], d["unseen_student"], "lower", on=ctx.images(unseen)),
                row("denoised_distance_all", f"  same, all {n} images ({n - len(unseen)} of them trained on)",
                    d["teacher"], d["student"], "lower", on=everything)]
    if ctx.val is not None:
        val = ctx.images(ctx.val)
        d.update(val_images=len(ctx.val), val_trained=val.trained,
                 val_teacher=tta.teacher_distances[ctx.val].mean().item(), val_student=dist_s[ctx.val].mean().item())
        rows.append(row("denoised_distance_val", f"  same, val images only ({len(ctx.val)}{trained_words(val)})",
                        d["val_teacher"], d["val_student"], "lower", on=val))
    return Measured(d, rows)


def trained_words(on: Images) -> str:
    """`, 10 of them trained on` / `, none trained on` after an image count in a label; nothing when not known."""
    if on.trained is None:
        return ""
    return f", {on.trained} of them trained on" if on.trained else ", none trained on"


@metric()
def tta_noise(ctx: Context) -> Measured:
    """Each model's distance to its own TTA-denoised features (position-tied noise)."""
    on = ctx.images()
    return Measured(None, [row("tta_noise", "own TTA noise (mean 1 - cos, raw vs own denoised)" + on.note(),
                               ctx.s_t["tta_noise"]["mean_1_minus_cos"], ctx.s_s["tta_noise"]["mean_1_minus_cos"],
                               "lower", on=on)])


@metric()
def outlier_fraction(ctx: Context) -> Measured:
    """High-norm patch tokens, the student judged by the teacher's own data-derived threshold."""
    thr = ctx.s_t["outliers"]["threshold"]
    label = (("high-norm patch tokens (teacher's threshold %.0f)" % thr) if thr != float("inf")
             else "high-norm patch tokens (own rule; teacher has none)")
    on = ctx.images()
    return Measured(None, [row("outlier_fraction", label + on.note(), ctx.s_t["outliers"]["fraction"],
                               ctx.judged["fraction"], "lower", on=on)])


@metric()
def max_norm_ratio(ctx: Context) -> Measured:
    on = ctx.images()
    return Measured(None, [row("max_norm_ratio", "max / median patch norm, last block" + on.note(),
                               ctx.s_t["outliers"]["max_over_median"], ctx.s_s["outliers"]["max_over_median"],
                               "lower", on=on)])


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
    on = ctx.images()
    return Measured(cos, [row("cls_cosine", "CLS token cosine to the teacher's" + on.note(), 1.0, cos, None,
                              note=CLS_COSINE_NOTE, on=on)])



@metric("probe", stage="probe")
def probe(ctx: Context) -> Measured | None:
    """The segmentation probe (`probe.py`), when masks and their class count are given."""
    d, o = ctx.data, ctx.options
    if d is None or not d.segmentation or not o.probe_steps:
        return None
    from .probe import segmentation_scores

    got = ctx.both("segmentation", lambda m, role: segmentation_scores(m, d, o.probe_steps, o.device, role))
    p = dict(train_images=len(d.train), val_images=len(d.val), split=d.val_name, num_classes=d.num_classes,
             ignore_index=d.ignore_index, steps=o.probe_steps, **got)
    on = ctx.val_images()  # the split's val images: some may be the student's training images
    also = f", {on.trained} of them trained on by the student" if on.trained else ""
    return Measured(p, [
        row("miou", f"linear-probe mIoU ({p['val_images']} {d.val_name} images{also})", p["teacher"]["miou"],
            p["student"]["miou"], "higher", on=on),
        row("pixel_accuracy", "linear-probe pixel accuracy" + on.note(), p["teacher"]["pixel_accuracy"],
            p["student"]["pixel_accuracy"], "higher", on=on)])


@metric("depth", stage="probe")
def depth(ctx: Context) -> Measured | None:
    """The depth probe (`depth.py`), when depth maps are given: RMSE, AbsRel and delta < 1.25 in the summary, the
    paper's six metrics in eval.json, and pictures (image | ground truth | teacher | student) of the first val
    images."""
    d, o = ctx.data, ctx.options
    if d is None or not d.depth_probe or not o.probe_steps:
        return None
    from .depth import depth_scores
    from .figures import depth_figure, picture_names

    keep = min(o.pictures, 4)
    got = ctx.both("depth", lambda m, role: depth_scores(m, d, o.probe_steps, o.device, role, keep))
    value = dict(train_images=len(d.train), val_images=len(d.val), split=d.val_name, max_depth=d.max_depth,
                 eval_crop=d.eval_crop, steps=o.probe_steps, **{role: g[0] for role, g in got.items()}, figures=[])
    shown = d.val[:min(keep, len(got["teacher"][1]), len(got["student"][1]))]
    names = picture_names([d.files[j] for j in shown], "depth_")
    for i, j in enumerate(shown):
        value["figures"].append(depth_figure(d.files[j], d.depth[j], d.depth_scale, d.max_depth,
                                             [(role, g[1][i]) for role, g in got.items()], ctx.out / names[i],
                                             name=d.files[j].name).name)
    t, s, on = value["teacher"], value["student"], ctx.val_images()
    also = f", {on.trained} of them trained on by the student" if on.trained else ""
    return Measured(value, [
        row("depth_rmse", f"depth-probe RMSE, m ({len(d.val)} {d.val_name} images{also})", t["rmse"], s["rmse"],
            "lower", on=on),
        row("depth_abs_rel", "depth-probe AbsRel (mean |error| / depth)" + on.note(), t["abs_rel"], s["abs_rel"],
            "lower", on=on),
        row("depth_delta1", "depth-probe δ < 1.25 (share of pixels)" + on.note(), t["delta1"], s["delta1"], "higher",
            on=on)])


@metric("zeroshot", stage="zero-shot")
def zeroshot(ctx: Context) -> Measured | None:
    """Zero-shot segmentation (`zeroshot.py`), when classes are given (CLIP family; needs masks)."""
    o, d = ctx.options, ctx.data
    if o.zeroshot is None:
        return None
    from .probe import load_masks
    from .zeroshot import evaluate_zeroshot

    masks = [d.masks[i] for i in d.analysed]
    gt = load_masks(ctx.files, masks, o.zeroshot.classes.num_labels, d.ignore_index, d.label_map)
    z = evaluate_zeroshot(ctx.teacher, ctx.student, ctx.files, gt, o.zeroshot, d.ignore_index, ctx.out,
                          min(o.pictures, 4), o.device)
    on = ctx.images()
    return Measured(z, [row("zeroshot_miou", f"zero-shot mIoU ({z['images']} images{trained_words(on)}; teacher "
                                             f"{z['teacher']['head']}, student {z['student']['head']})",
                            z["teacher"]["miou"], z["student"]["miou"], "higher", on=on)])


@metric("cost")
def cost(ctx: Context) -> Measured:
    """Parameters, forward FLOPs per image and images/s of each model (the last: a speed, not a verdict)."""
    c = dict(teacher=model_cost(ctx.teacher, ctx.options.device), student=model_cost(ctx.student, ctx.options.device))
    return Measured(c, [
        row("gflops", "forward GFLOPs per image", c["teacher"]["gflops"], c["student"]["gflops"], "lower",
            on=NOT_ON_IMAGES),
        # measured once on whatever machine ran eval, next to other work: a speed, not a verdict
        row("images_per_s", f"images/s (batch {c['teacher']['batch']}, this machine)", c["teacher"]["images_per_s"],
            c["student"]["images_per_s"], None, note=HARDWARE_DEPENDENT, on=NOT_ON_IMAGES)])


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


# ---------------------------------------------------------------------------------------------------------------------
# Artifact measures that hold for every family: both tails of the norm distribution at every block, the distance to
# the denoised targets per token (PH-Reg Fig. 5), where attention goes, how uneven patch norms are.

TAIL_RATIO = 2.0  # a patch token is an outlier beyond 2x or below 1/2 of its image's median norm (`phreg.ttr`'s rule)
BATCH = 8


@torch.no_grad()
def block_patch_norms(model: torch.nn.Module, images: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
    """(depth, B, L): the pre-norm patch-token norms at the output of every block, one forward per batch."""
    from ..backbones import backbone

    family, depth = backbone(model), len(model.blocks)
    device = next(model.parameters()).device
    out = []
    for x in images.split(batch):
        _, blocks = family.block_outputs(x.to(device), depth)
        out.append(torch.stack([b[:, family.num_prefix:].float().norm(dim=-1) for b in blocks]).cpu())
    return torch.cat(out, 1)


def tail_fractions(norms: torch.Tensor, ratio: float = TAIL_RATIO) -> list[dict]:
    """(depth, B, L) norms -> per block {block, high, low, both}: fractions of patch tokens beyond `ratio` x / below
    1/`ratio` of their image's median (`phreg.ttr.outlier_mask`, both tails)."""
    from ..ttr.neurons import outlier_mask

    rows = []
    for block, n in enumerate(norms):
        high, low = outlier_mask(n, ratio, "both")
        h, lo = high.float().mean().item(), low.float().mean().item()
        rows.append(dict(block=block, high=h, low=lo, both=h + lo))
    return rows


@metric("norm_tails")
def norm_tails(ctx: Context) -> Measured:
    """Outliers in both tails of the patch-norm distribution, at every block: high-norm artifacts (DINOv2-L/g, DeiT-III)
    and low-norm ones (CLIP, OpenCLIP: PH-Reg Fig. 6), and where they appear, not only at the last block. The rule is
    relative to each image's median, so it needs no per-model constant."""
    images = ctx.a_t.tta.images
    per = {role: tail_fractions(block_patch_norms(m.model, images)) for role, m in
           (("teacher", ctx.teacher), ("student", ctx.student))}
    worst = {role: max(rows, key=lambda r: r["both"]) for role, rows in per.items()}
    first = {role: next((r["block"] for r in rows if r["both"] > 0), None) for role, rows in per.items()}
    last = {role: rows[-1] for role, rows in per.items()}
    value = dict(ratio=TAIL_RATIO, rule=f"patch-token norm (pre-norm block output) above {TAIL_RATIO:g}x or below "
                                        f"1/{TAIL_RATIO:g} of its image's median", per_block=per, worst=worst,
                 first_block=first)
    at = " / ".join(f"block {w['block']}" if w["both"] > 0 else "no outliers" for w in worst.values())
    on = ctx.images()
    return Measured(value, [
        row("outliers_two_tailed", f"outliers, both tails ({TAIL_RATIO:g}x / 1/{TAIL_RATIO:g} median), last block"
            + on.note(), last["teacher"]["both"], last["student"]["both"], "lower", on=on),
        row("outliers_low_tail", f"  of which below 1/{TAIL_RATIO:g} (low-norm artifacts)" + on.note(),
            last["teacher"]["low"], last["student"]["low"], "lower", on=on),
        row("outliers_worst_block", f"  same, at the block with the most ({at})" + on.note(), worst["teacher"]["both"],
            worst["student"]["both"], "lower", on=on)])


@torch.no_grad()
def token_distances(held, model: torch.nn.Module) -> torch.Tensor:
    """(B, L): 1 - cos between each patch token of `model` (read through the held-out set's head) and its
    TTA-denoised target."""
    from ..backbones import patch_tokens

    device = next(model.parameters()).device
    out = []
    for x, t in zip(held.images.split(held.batch_size), held.targets.split(held.batch_size)):
        f = patch_tokens(model, x.to(device), held.head, held.sigma).float().cpu()
        out.append(1 - torch.nn.functional.cosine_similarity(f, t.float(), dim=-1))
    return torch.cat(out)


QUANTILES = (0.5, 0.9, 0.99)


@metric("denoised_distance_tokens")
def denoised_distance_tokens(ctx: Context) -> Measured:
    """The distance to the teacher's TTA-denoised features per patch token, as p50 / p90 / p99 (PH-Reg Fig. 5): a
    mean hides the few tokens an artifact ruins, the tail shows them. On the headline's images (`Context.headline`)."""
    import numpy as np

    idx = ctx.headline()  # the headline's images: never-trained ones when some are
    d = {role: token_distances(ctx.a_t.tta, m.model)[idx] for role, m in (("teacher", ctx.teacher),
                                                                           ("student", ctx.student))}
    q = {role: [float(v) for v in np.quantile(t.flatten().numpy(), QUANTILES)] for role, t in d.items()}
    value = {role: dict(mean=float(t.mean()), **{f"p{round(100 * p)}": v for p, v in zip(QUANTILES, q[role])})
             for role, t in d.items()} | dict(tokens=int(d["teacher"].numel()), images=len(idx))
    on = ctx.images(idx)
    where = f", {len(idx)} never-trained images" if len(idx) < len(ctx.files) else ""
    return Measured(value, [row(f"denoised_distance_p{round(100 * p)}",
                                f"  same, per patch token{where}: p{round(100 * p)}" + on.note(), q["teacher"][i],
                                q["student"][i], "lower", on=on) for i, p in enumerate(QUANTILES)])


@torch.no_grad()
def register_attention_share(model: torch.nn.Module, images: torch.Tensor, batch: int = BATCH) -> dict:
    """The share of attention that register tokens absorb in the last block (mean over heads and images): from the
    class token (None without one) and from the patch tokens (mean over patches). 0 for a model without registers."""
    from ..backbones import backbone
    from ..backbones.attention import eager_attention

    family = backbone(model)
    c, prefix = int(family.has_class_token), family.num_prefix
    if not family.num_registers:
        return dict(cls=0.0 if c else None, patches=0.0, registers=0)
    device = next(model.parameters()).device
    cls, patches = [], []

    def absorbed(module, args, w):  # w: (B, heads, N, N) softmax weights of the last block
        to_registers = w[..., c:prefix].float().sum(-1).mean(1)  # (B, N)
        if c:
            cls.append(to_registers[:, 0].cpu())
        patches.append(to_registers[:, prefix:].mean(1).cpu())
    attention = family.attention(-1)
    hook = attention.attn_drop.register_forward_hook(absorbed)
    try:
        with eager_attention(attention):
            for x in images.split(batch):
                model.forward_features(x.to(device))
    finally:
        hook.remove()
    return dict(cls=torch.cat(cls).mean().item() if c else None, patches=torch.cat(patches).mean().item(),
                registers=family.num_registers)


@metric("register_attention")
def register_attention(ctx: Context) -> Measured:
    """How much of the class token's and the patches' attention the registers absorb (last block): registers that
    work take the global attention the artifacts took (Darcet et al., 2024). Where attention goes, not a verdict."""
    images = ctx.a_t.tta.images
    value = {role: register_attention_share(m.model, images) for role, m in (("teacher", ctx.teacher),
                                                                             ("student", ctx.student))}
    on = ctx.images()
    rows = [row("register_attention_patches", "attention absorbed by registers, patch tokens (last block)"
                + on.note(), value["teacher"]["patches"], value["student"]["patches"], None,
                note="where attention goes", on=on)]
    if value["teacher"]["cls"] is not None or value["student"]["cls"] is not None:
        rows.insert(0, row("register_attention_cls", "attention absorbed by registers, class token (last block)"
                           + on.note(), value["teacher"]["cls"], value["student"]["cls"], None,
                           note="where attention goes", on=on))
    return Measured(value, rows)


def norm_variance(norms: torch.Tensor) -> dict:
    """(B, L) patch norms -> variance, mean, and variance / mean² (scale-free: comparable across families)."""
    n = norms.float()
    var, mean = n.var().item(), n.mean().item()
    return dict(variance=var, mean=mean, relative=var / mean ** 2 if mean else None)


@metric("patch_norm_variance")
def patch_norm_variance(ctx: Context) -> Measured:
    """How uneven the patch norms of the last block are (pre-norm): artifacts in either tail raise it."""
    value = dict(layer=ctx.a_t.artifact_layer, teacher=norm_variance(ctx.a_t.patch_norms),
                 student=norm_variance(ctx.a_s.patch_norms))
    on = ctx.images()
    return Measured(value, [row("patch_norm_variance", "patch-norm variance / mean², last block" + on.note(),
                                value["teacher"]["relative"], value["student"]["relative"], "lower", on=on)])


# Every metric, in the order of its rows in eval.json's summary, the terminal table, report.html and the model card.
METRICS: list[Metric] = [fn.metric for fn in (
    denoised_distance, denoised_distance_tokens, tta_noise, outlier_fraction, max_norm_ratio, norm_tails,
    register_attention, patch_norm_variance, high_norm_mass, cls_cosine, probe, depth, zeroshot, cost)]
