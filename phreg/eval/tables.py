"""Teacher-vs-student tables as people read them: `phreg eval` in the terminal, report.html and the model card.

One number format and one rule for which side of a row is better, so the three never disagree; the renderers
(`text_table` here for the terminal, `eval.report`, `hub.card`) only lay rows out. Torch-free: the card is built
without it.
"""

from __future__ import annotations

import math

MISSING = "–"  # what a value that was not measured (None) or is not a number (NaN, inf) reads as
HARDWARE_DEPENDENT = "hardware-dependent"  # a row's note: a speed of one machine at one moment, never judged
_HARDWARE_METRICS = {"images_per_s"}  # the same, for eval.json files written before rows carried their note


def number(v, missing: str = MISSING) -> str:
    """4 significant digits below 1000, whole numbers with thousands separators from there: 0.01722, 12.25, 12,346.
    Anything that is not a number is shown as it is."""
    if v is None:
        return missing
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if not math.isfinite(v):
        return missing
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def hardware_dependent(row: dict) -> bool:
    """A row that measures the machine (images/s), shown as measured and never judged."""
    return row.get("note") == HARDWARE_DEPENDENT or row.get("metric") in _HARDWARE_METRICS


def held_out(row: dict) -> bool:
    """Is a summary row measured on images none of which the student trained on (or on no image: a model's cost)?
    Only such a row is evidence of what the student does beyond its training set, so only such a row gets a verdict
    mark (green in the report, bold in the card): a row that mixes in training images, or whose images' overlap with
    the training set is not known (`trained_images` None or absent, as in eval.json files written before rows said
    it), is shown as measured."""
    return row.get("trained_images") == 0


def winner(row: dict) -> str | None:
    """'student' or 'teacher': the better side of a summary row {teacher, student, better: 'lower' | 'higher'};
    None for a tie (to 1e-9, relative), a value that is missing or not finite, a row without a verdict, or a row
    not measured on held-out images alone (`held_out`)."""
    t, s, better = row.get("teacher"), row.get("student"), row.get("better")
    if hardware_dependent(row) or better not in ("lower", "higher") or not held_out(row):
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (t, s)):
        return None
    if abs(s - t) <= 1e-9 * max(1.0, abs(t)):
        return None
    return "student" if (s < t) == (better == "lower") else "teacher"


def zeroshot_iou_rows(z: dict) -> list[dict]:
    """eval.json's `zeroshot` section as rows {label, teacher, student}: the mIoU (`total`), then each class's IoU."""
    t, s = z["teacher"], z["student"]
    return [dict(label="mIoU", teacher=t["miou"], student=s["miou"], total=True),
            *(dict(label=name, teacher=t["per_class_iou"][name], student=s["per_class_iou"][name])
              for name in t["per_class_iou"])]


def columns(report: dict) -> list[tuple[str, str]]:
    """(key, label) of the models a report compares, in table order: eval.json's `columns` when `phreg eval` measured
    more than a pair (teacher, test-time registers, PH-Reg student, both), else teacher and student."""
    cols = report.get("columns")
    return [(c["key"], c["label"]) for c in cols] if cols else [("teacher", "teacher"), ("student", "student")]


def cell(row: dict, key: str):
    """A row's value for one column: `teacher` / `student`, or one of its `others`."""
    return row.get(key) if key in ("teacher", "student") else (row.get("others") or {}).get(key)


def best(row: dict, keys: list[str]) -> set[str]:
    """The columns holding a row's best value (by its `better`), none when all are equal, a value is missing, the
    row has no verdict (e.g. images/s) or is not on held-out images alone (`held_out`). With two columns this is
    `winner`."""
    better = row.get("better")
    if hardware_dependent(row) or better not in ("lower", "higher") or not held_out(row):
        return set()
    values = {k: cell(row, k) for k in keys}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values.values()):
        return set()
    top = (min if better == "lower" else max)(values.values())
    tie = 1e-6 * max(1.0, abs(top))  # columns of different token counts differ by float noise
    if all(abs(v - top) <= tie for v in values.values()):
        return set()
    return {k for k, v in values.items() if abs(v - top) <= tie}


def text_table(report: dict) -> str:
    """`phreg eval`'s table in the terminal: a row per metric, a column per model, which side is better."""
    cols = columns(report)
    w = max([52] + [len(row["label"]) + 2 for row in report["summary"]])  # labels say which images a row is on
    width = 21 if len(cols) > 2 else 12
    lines = [f"{'metric':<{w}}" + "".join(f"{label[:20]:>21}" if len(cols) > 2 else f"{label:>12}"
                                          for _, label in cols) + "  better"]
    for row in report["summary"]:
        verdict = row["better"] or row.get("note") or ""
        lines.append(f"{row['label']:<{w}}" + "".join(f"{number(cell(row, k), '-'):>{width}}" for k, _ in cols)
                     + f"  {verdict}")
    return "\n".join(lines)
