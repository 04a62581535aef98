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

from .. import __version__
from ..config.recipe import ViewsCfg
from ..files.atomic import write_json
from ..models.specs import Loaded
from ..run.training_list import no_training, overlap
from .analysis import Analysis, analyze, to_rgb
from .datasets import EvalSet
from .figures import norm_histogram, norm_range, panels, picture_names
from .inputs import check_images
from .inspection import crops, shown_name, verdict
from .metrics import Context, EvalOptions, METRICS, Measured, Metric, STAGES
from .report import write_report

SCHEMA = "phreg.eval/1"


def evaluate(student: Loaded, teacher: Loaded, images: str | Path | EvalSet, out: Path,
             options: EvalOptions | None = None, others: dict[str, Loaded] | None = None,
             columns: dict[str, str] | None = None, ttr: dict | None = None) -> dict:
    """Teacher vs student on `images`: a folder (every image under it, no labels) or an `EvalSet` (images with masks
    and / or depth maps and a split: `phreg.eval.datasets`). Writes OUT/eval.json, OUT/report.html and pictures.
    The artifact metrics run on `EvalSet.analysed`, the probes on its train / val split.

    `others` ({key: model}, e.g. "ttr": the teacher with test-time registers, "both": the student with them) are
    measured against the same teacher, metric by metric, on the same images and view plans: each summary row then
    also holds `others: {key: value}`, eval.json `columns` (key, label, model name, in table order) and `others`
    (each one's inspect summary, verdict and metric values). `columns` gives the labels ({key: label}, "teacher" and
    "student" included) and the order; `ttr` is the test-time registers' record. Zero-shot is scored for the pair
    only."""
    o, clock = options or EvalOptions(), Clock()
    data = images if isinstance(images, EvalSet) else EvalSet(check_images(images, o.limit), root=str(images))
    files = [data.files[i] for i in data.analysed]
    crops_ = crops(files, student)
    clock.lap("images")
    vcfg = ViewsCfg(num=o.views)
    t = Side.of(teacher, crops_, vcfg, o)
    clock.lap("teacher")
    s = Side.of(student, crops_, vcfg, o, t.threshold)
    clock.lap("student")
    probing = data.kind == "folder" and (data.segmentation or data.depth_probe) and o.probe_steps  # split in `files`
    train, val = (data.train, data.val) if probing else (None, None)
    # which images the student trained on, from its run's training list
    seen = no_training(files) if o.untrained else overlap(student.run, files)
    out.mkdir(parents=True, exist_ok=True)

    def context(side: Side, opts: EvalOptions) -> Context:  # every column on the images its row's label names
        return Context(teacher=teacher, student=side.loaded, files=files, a_t=t.analysis, a_s=side.analysis,
                       s_t=t.summary, s_s=side.summary, judged=side.judged, options=opts, out=out, data=data,
                       train=train, val=val, unseen=seen["unseen"])

    result = _header(teacher, student, t, s, files, data, o, seen)
    measured = _measure(context(s, o), clock.lap)
    result.update({m.key: got.value for m, got in measured.items() if m.key is not None})
    result["summary"] = [r for m in METRICS if m in measured for r in measured[m].rows]
    extra: dict[str, Side] = {}
    for key, loaded in (others or {}).items():
        extra[key] = Side.of(loaded, crops_, vcfg, o, t.threshold)
        _add_column(result, key, extra[key], _measure(context(extra[key], replace(o, zeroshot=None, pictures=0))))
        clock.lap(key)
    if others or columns:
        result["columns"] = _columns(columns, dict(teacher=teacher, student=student) | (others or {}))
    if ttr is not None:
        result["ttr"] = ttr
    result["figures"] = _pictures(t.analysis, s.analysis, crops_, student, t.threshold, out,
                                  {k: v.analysis for k, v in extra.items()}, result.get("columns"),
                                  [shown_name(f, data.root) for f in files])
    clock.lap("pictures")
    result["timings"], result["seconds"] = clock.timings, clock.total()
    write_json(out / "eval.json", result)
    write_report(result, out / "report.html")
    return result


class Clock:
    """Seconds per stage of an evaluation (eval.json's `timings`)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 1)
        self.last = now

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)


@dataclass
class Side:
    """One model as eval measures it: its analysis, inspect summary and outliers under the teacher's threshold."""
    loaded: Loaded
    analysis: Analysis
    summary: dict
    judged: dict  # outliers at `threshold` (the teacher's own data-derived one)

    @classmethod
    def of(cls, loaded: Loaded, images, vcfg: ViewsCfg, o: EvalOptions, threshold: float | None = None) -> "Side":
        a = analyze(loaded, images, vcfg, o.seed, pictures=o.pictures, device=o.device)
        summary = a.summary()
        threshold = summary["outliers"]["threshold"] if threshold is None else threshold
        judged = a.outliers(threshold if threshold != float("inf") else None)
        judged.pop("mask")
        return cls(loaded, a, summary, judged)

    @property
    def threshold(self) -> float:
        return self.summary["outliers"]["threshold"]


def _header(teacher: Loaded, student: Loaded, t: Side, s: Side, files, data: EvalSet, o: EvalOptions,
            seen: dict) -> dict:
    """eval.json's description of what was measured, on what, before any metric."""
    dataset = dict(data.source, kind=data.kind, images=data.source.get("images", data.root), limit=o.limit)
    if (data.segmentation or data.depth_probe) and o.probe_steps:
        dataset.update(probe_train=len(data.train), probe_val=len(data.val), split_rule=data.split_rule,
                       val_name=data.val_name)
    return dict(
        schema=SCHEMA, phreg_version=__version__, seconds=None, images=len(files), img_size=student.img_size,
        views=o.views, seed=o.seed, files=[str(f) for f in files], dataset=dataset, training_overlap=seen,
        teacher=dict(name=teacher.name, inspect=t.summary, verdict=verdict(t.summary)),
        student=dict(name=student.name, inspect=s.summary, verdict=verdict(s.summary),
                     outliers_at_teacher_threshold=s.judged))


def _add_column(result: dict, key: str, side: Side, measured: dict[Metric, Measured]) -> None:
    """Another model's values: its own entry under `others`, and its value in every summary row."""
    result.setdefault("others", {})[key] = dict(
        name=side.loaded.name, inspect=side.summary, verdict=verdict(side.summary),
        outliers_at_teacher_threshold=side.judged, **{m.key: g.value for m, g in measured.items() if m.key is not None})
    theirs = {r["metric"]: r["student"] for g in measured.values() for r in g.rows}
    for r in result["summary"]:
        r.setdefault("others", {})[key] = theirs.get(r["metric"])


def _columns(labels: dict[str, str] | None, models: dict[str, Loaded]) -> list[dict]:
    """eval.json's `columns`: key, label and model name, in the labels' order (the rest after them)."""
    labels = labels or dict(teacher="teacher", student="student")
    order = [k for k in labels if k in models] + [k for k in models if k not in labels]
    return [dict(key=k, label=labels.get(k, k), name=models[k].name) for k in order]


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
              extra: dict[str, Analysis] | None = None, columns: list[dict] | None = None,
              names: list[str] | None = None) -> list[str]:
    """Teacher above student (and any other models, in table order) per pictured image, `compare_<image>.png` titled
    with the image's name (`names`), with shared colour scales, and every model's norm histogram."""
    analyses = dict(teacher=a_t, student=a_s) | (extra or {})
    order = [(c["label"], analyses[c["key"]]) for c in columns] if columns else \
        [("teacher", a_t), ("student", a_s)]
    shared = norm_range([m for _, a in order for m in a.maps]) if a_t.maps else None  # one colour range for all
    shown = min(len(a.maps) for _, a in order)
    names = names or [f"image {i}" for i in range(len(images))]
    files = picture_names([Path(n) for n in names[:shown]], "compare_")
    figures = [panels(to_rgb(images[i], student.mean, student.std), [(label, a.maps[i]) for label, a in order],
                      out / files[i], shared, title=names[i]).name for i in range(shown)]
    figures.append(norm_histogram([(label, a.norms[a.artifact_layer]) for label, a in order],
                                  out / "norm_histogram.png", threshold).name)
    return figures
