"""`phreg eval`: what distillation changed, teacher vs student, on the same images, seeds and view plans.

eval.json (schema "phreg.eval/1") holds everything; its `summary` is a list of rows {metric, label, teacher,
student, better} that the report, the model card (`phreg push`) and people read first. Each metric, and the rows it
reads as, is one function in `metrics.py`; this module loads the images, analyzes both models, runs the metrics and
writes eval.json, the pictures and report.html.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from .analysis import Analysis, analyze, to_rgb
from .figures import norm_histogram, norm_range, panels
from ..files import write_json
from .inspection import load_images, verdict
from .metrics import METRICS, STAGES, Context, Measured, Metric
from ..models import Loaded
from .inputs import split_indices
from ..recipe import ViewsCfg
from ..training_list import overlap
from .report import write_report

if TYPE_CHECKING:
    from .zeroshot import ZeroShot

SCHEMA = "phreg.eval/1"


@dataclass(frozen=True)
class EvalOptions:
    """How `evaluate` measures: everything but the two models, the images and the output folder."""
    views: int = 10  # TTA views of the denoised features
    limit: int = 0  # at most this many images (sorted by path); 0: all
    pictures: int = 8  # comparison pictures for the first N images
    seed: int = 0  # seed of the view plans
    masks: str | Path | None = None  # label masks: the linear probe (with num_classes) and zero-shot
    num_classes: int | None = None
    ignore_index: int | None = None
    split: str | Path | None = None  # train/val split file of the probe (default: every 4th image is val)
    device: str = "cpu"
    zeroshot: ZeroShot | None = None  # zero-shot segmentation (needs masks)

    @property
    def probing(self) -> bool:
        return bool(self.masks) and self.num_classes is not None


def evaluate(student: Loaded, teacher: Loaded, images_dir, out: Path, options: EvalOptions = EvalOptions(),
             others: dict[str, Loaded] | None = None, columns: dict[str, str] | None = None,
             ttr: dict | None = None) -> dict:
    """Teacher vs student on the images under `images_dir`: OUT/eval.json, OUT/report.html and pictures.

    `others` ({key: model}, e.g. "ttr": the teacher with test-time registers, "both": the student with them) are
    measured against the same teacher, metric by metric, on the same images and view plans: each summary row then
    also holds `others: {key: value}`, eval.json `columns` (key, label, model name, in table order) and `others`
    (each one's inspect summary, verdict and metric values). `columns` gives the labels ({key: label}, "teacher" and
    "student" included) and the order; `ttr` is the test-time registers' record. Zero-shot is scored for the pair
    only."""
    o = options
    start = time.perf_counter()
    timings: dict[str, float] = {}
    clock = [start]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 1)
        clock[0] = now

    files, images = load_images(images_dir, student, o.limit)
    lap("images")
    vcfg = ViewsCfg(num=o.views)
    a_t: Analysis = analyze(teacher, images, vcfg, o.seed, pictures=o.pictures, device=o.device)
    lap("teacher")
    a_s: Analysis = analyze(student, images, vcfg, o.seed, pictures=o.pictures, device=o.device)
    lap("student")
    s_t, s_s = a_t.summary(), a_s.summary()
    t_thr = s_t["outliers"]["threshold"]  # judge the student by the teacher's own data-derived threshold
    judged = a_s.outliers(t_thr if t_thr != float("inf") else None)
    judged.pop("mask")
    train, val = split_indices(files, o.split) if o.probing else (None, None)
    seen = overlap(student.run, files)  # which images the student trained on, from its run's training list
    dataset = dict(images=str(images_dir), masks=str(o.masks) if o.masks else None,
                   split=str(o.split) if o.split else None, limit=o.limit)
    if o.probing:
        dataset.update(probe_train=len(train), probe_val=len(val),
                       split_rule=f"from {Path(o.split).name}" if o.split else "every 4th image is val")
    result = dict(
        schema=SCHEMA, phreg_version=__version__, seconds=None, images=len(files), img_size=student.img_size,
        views=o.views, seed=o.seed, files=[str(f) for f in files], dataset=dataset, training_overlap=seen,
        teacher=dict(name=teacher.name, inspect=s_t, verdict=verdict(s_t)),
        student=dict(name=student.name, inspect=s_s, verdict=verdict(s_s), outliers_at_teacher_threshold=judged),
    )
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(teacher=teacher, student=student, files=files, a_t=a_t, a_s=a_s, s_t=s_t, s_s=s_s, judged=judged,
                  options=o, out=out, train=train, val=val, unseen=seen["unseen"])
    measured = _measure(ctx, lap)
    for m, got in measured.items():
        if m.key is not None:
            result[m.key] = got.value
    result["summary"] = [r for m in METRICS if m in measured for r in measured[m].rows]
    extra: dict[str, Analysis] = {}
    if others:
        result["others"] = {}
        for key, loaded in others.items():
            a_o = extra[key] = analyze(loaded, images, vcfg, o.seed, pictures=o.pictures, device=o.device)
            s_o = a_o.summary()
            judged_o = a_o.outliers(t_thr if t_thr != float("inf") else None)
            judged_o.pop("mask")
            ctx_o = Context(teacher=teacher, student=loaded, files=files, a_t=a_t, a_s=a_o, s_t=s_t, s_s=s_o,
                            judged=judged_o, options=replace(o, zeroshot=None), out=out, train=train, val=val,
                            unseen=seen["unseen"])  # every column on the images its row's label names
            got_o = _measure(ctx_o)
            lap(key)
            result["others"][key] = dict(name=loaded.name, inspect=s_o, verdict=verdict(s_o),
                                         outliers_at_teacher_threshold=judged_o,
                                         **{m.key: g.value for m, g in got_o.items() if m.key is not None})
            theirs = {r["metric"]: r["student"] for g in got_o.values() for r in g.rows}
            for r in result["summary"]:
                r.setdefault("others", {})[key] = theirs.get(r["metric"])
        labels = columns or dict(teacher="teacher", student="student")
        names = dict(teacher=teacher.name, student=student.name) | {k: v.name for k, v in others.items()}
        order = [k for k in labels if k in names] + [k for k in names if k not in labels]
        result["columns"] = [dict(key=k, label=labels.get(k, k), name=names[k]) for k in order]
    elif columns:  # a pair with labels of its own, e.g. teacher vs test-time registers
        result["columns"] = [dict(key=k, label=columns.get(k, k), name=m.name)
                             for k, m in (("teacher", teacher), ("student", student))]
    if ttr is not None:
        result["ttr"] = ttr
    result["figures"] = _pictures(a_t, a_s, images, student, t_thr, out, extra, result.get("columns"))
    lap("pictures")
    result["timings"] = timings
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out / "eval.json", result)
    write_report(result, out / "report.html")
    return result


def _measure(ctx: Context, lap=None) -> dict[Metric, Measured]:
    """Every registered metric on one pair, stage by stage (each stage timed by `lap` when given)."""
    measured: dict[Metric, Measured] = {}
    for stage in STAGES:  # each stage timed on its own; the summary keeps the metrics' registration order
        for m in METRICS:
            if m.stage == stage and (got := m.measure(ctx)) is not None:
                measured[m] = got
        if lap is not None and any(m.stage == stage for m in measured):
            lap(stage)
    return measured


def _pictures(a_t: Analysis, a_s: Analysis, images, student: Loaded, threshold: float, out: Path,
              extra: dict[str, Analysis] | None = None, columns: list[dict] | None = None) -> list[str]:
    """Teacher above student (and any other models, in table order) per pictured image, with shared colour scales,
    and every model's norm histogram."""
    analyses = dict(teacher=a_t, student=a_s) | (extra or {})
    order = [(c["label"], analyses[c["key"]]) for c in columns] if columns else \
        [("teacher", a_t), ("student", a_s)]
    shared = norm_range([m for _, a in order for m in a.maps]) if a_t.maps else None  # one colour range for all
    figures = [panels(to_rgb(images[i], student.mean, student.std), [(label, a.maps[i]) for label, a in order],
                      out / f"compare_{i}.png", shared).name for i in range(min(len(a.maps) for _, a in order))]
    figures.append(norm_histogram([(label, a.norms[a.artifact_layer]) for label, a in order],
                                  out / "norm_histogram.png", threshold).name)
    return figures
