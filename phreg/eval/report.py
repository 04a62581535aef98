"""A self-contained report.html (pictures inlined as base64) for `phreg eval`."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..files.atomic import write_atomic
from ..run.training_list import overlap_line
from .tables import best, cell, columns, number, winner, zeroshot_iou_rows

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} td,th{padding:4px 10px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left} .good{color:#0a7d32;font-weight:600} .bad{color:#b3261e}
img{max-width:100%;border:1px solid #eee;margin:.4em 0} .muted{color:#777;font-size:.9em}
code{background:#f4f4f4;padding:1px 4px;border-radius:3px}
"""


def _fmt(v) -> str:
    return html.escape(number(v))


def _verdict_class(row: dict) -> str:
    return {"student": "good", "teacher": "bad"}.get(winner(row), "")


def summary_table(rows: list[dict], cols: list[tuple[str, str]] | None = None) -> str:
    if cols and len(cols) > 2:  # teacher, test-time registers, student, both: a column each, the best in green
        out = ["<table><tr><th>metric</th>" + "".join(f"<th>{html.escape(label)}</th>" for _, label in cols)
               + "<th>better</th></tr>"]
        for r in rows:
            top = best(r, [k for k, _ in cols])
            out.append(f"<tr><td>{html.escape(r['label'])}</td>"
                       + "".join(f"<td class='{'good' if k in top else ''}'>{_fmt(cell(r, k))}</td>" for k, _ in cols)
                       + f"<td>{r['better'] or ''}</td></tr>")
        out.append("</table>")
        return "\n".join(out)
    out = ["<table><tr><th>metric</th><th>teacher</th><th>student</th><th>better</th></tr>"]
    for r in rows:
        out.append(f"<tr><td>{html.escape(r['label'])}</td><td>{_fmt(r['teacher'])}</td>"
                   f"<td class='{_verdict_class(r)}'>{_fmt(r['student'])}</td>"
                   f"<td>{html.escape(r['better'] or r.get('note') or '')}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img src='data:image/png;base64,{data}' alt='{html.escape(path.name)}'>"


def zeroshot_section(z: dict, folder: Path) -> str:
    """Per-class IoU, teacher vs student, and predicted label maps next to the ground truth."""
    t, s = z["teacher"], z["student"]

    def tr(r: dict) -> str:
        cells = (html.escape(r["label"]), _fmt(r["teacher"]), _fmt(r["student"]))
        return "<tr>" + "".join(f"<td><b>{c}</b></td>" if r.get("total") else f"<td>{c}</td>" for c in cells) + "</tr>"
    rows = "".join(tr(r) for r in zeroshot_iou_rows(z))
    window = (f"short side {z['short_side']}, {z['crop']} px windows every {z['stride']} px" if z["crop"]
              else f"short side {z['short_side']}, whole image")
    pictures = "\n".join(_img(folder / f) for f in z["figures"] if (folder / f).is_file())
    return (f"<h2>Zero-shot segmentation</h2><p class='muted'>{z['images']} images, {len(z['classes'])} classes "
            f"({z['synonyms']} names with synonyms) embedded by {html.escape(z['text_model'])} with the 80 ImageNet "
            f"templates; {window}; logit scale {z['logit_scale']:g}, background threshold "
            f"{z['background_threshold']:g}. Teacher read through {t['head']}, student through {s['head']}.</p>"
            f"<table><tr><th>class</th><th>teacher IoU</th><th>student IoU</th></tr>"
            f"{rows}<tr><td>pixel accuracy</td><td>{_fmt(t['pixel_accuracy'])}</td>"
            f"<td>{_fmt(s['pixel_accuracy'])}</td></tr></table>"
            f"<p class='muted'>image | ground truth | teacher | student</p>{pictures}")


def write_report(r: dict, path: Path) -> Path:
    folder = path.parent
    t, s = r["teacher"], r["student"]
    norms = []
    for role in ("teacher", "student"):
        for layer, kinds in r[role]["inspect"]["norms"].items():
            for kind, st in kinds.items():
                norms.append(f"<tr><td>{role}</td><td>{layer}</td><td>{kind}</td><td>{_fmt(st['median'])}</td>"
                             f"<td>{_fmt(st['p99'])}</td><td>{_fmt(st['max'])}</td></tr>")
    mass = r["high_norm_mass"]
    mass_rows = [f"<tr><td>{role}</td><td>{kind}</td><td>{_fmt(v['mean_norm'])}</td>"
                 f"<td>{_fmt(100 * v['squared_norm_share'])}%</td><td>{_fmt(100 * v['above_teacher_threshold'])}%</td></tr>"
                 for role in ("teacher", "student") for kind, v in mass[role].items()]
    probe = probe_section(r["probe"]) if "probe" in r else ""
    probe += depth_section(r, folder) if "depth" in r else ""
    pictures = "\n".join(_img(folder / f) for f in r["figures"] if (folder / f).is_file())
    zeroshot = zeroshot_section(r["zeroshot"], folder) if "zeroshot" in r else ""
    seen = f"<br>{html.escape(overlap_line(r['training_overlap']))}." if r.get("training_overlap") else ""
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>phreg eval</title><style>{CSS}</style></head><body>
<h1>phreg eval: {html.escape(Path(s['name']).name)} vs {html.escape(t['name'])}</h1>
<p class="muted">{r['images']} images at {r['img_size']} px, {r['views']} TTA views, seed {r['seed']};
same images, crops and view plans for both models. phreg {r['phreg_version']}, {r['seconds']} s.{seen}</p>
<p><b>teacher:</b> {html.escape(t['verdict'])}<br><b>student:</b> {html.escape(s['verdict'])}</p>
<h2>Summary</h2>{summary_table(r['summary'], columns(r))}
<p class="muted">{_legend(r)}</p>
{ttr_section(r)}{artifact_section(r)}
<h2>Where the high norms went ({html.escape(mass['layer'])}, pre-norm)</h2>
<table><tr><th>model</th><th>tokens</th><th>mean norm</th><th>share of squared norm</th><th>above teacher threshold</th></tr>
{''.join(mass_rows)}</table>
{probe}
{zeroshot}
<h2>{_pictures_heading(r)}</h2>{pictures}
<h2>Token norms</h2><table><tr><th>model</th><th>layer</th><th>kind</th><th>median</th><th>p99</th><th>max</th></tr>
{''.join(norms)}</table>
</body></html>"""
    return write_atomic(path, body)


def probe_section(p: dict) -> str:
    split = p.get("split", "val")
    return (f"<h2>Segmentation probe</h2><p class='muted'>BatchNorm + linear head on the frozen last block's patch "
            f"tokens (the paper's head), {p.get('steps', '?')} steps, trained on {p['train_images']} images, scored on "
            f"{p['val_images']} {split} images at the masks' resolution ({p['num_classes']} classes, ignore index "
            f"{p['ignore_index']}).</p>"
            f"<table><tr><th></th><th>mIoU</th><th>pixel accuracy</th></tr>"
            + "".join(f"<tr><td>{role}</td><td>{_fmt(p[role]['miou'])}</td><td>{_fmt(p[role]['pixel_accuracy'])}</td>"
                      f"</tr>" for role in ("teacher", "student")) + "</table>")


DEPTH_COLUMNS = (("delta1", "δ < 1.25"), ("delta2", "δ < 1.25²"), ("delta3", "δ < 1.25³"), ("abs_rel", "AbsRel"),
                 ("rmse", "RMSE (m)"), ("log10", "log10"))


def depth_section(r: dict, folder: Path) -> str:
    """The depth probe's six metrics per model (every column eval measured), and predicted depth beside the ground
    truth (teacher and student)."""
    d = r["depth"]
    values = dict(teacher=d["teacher"], student=d["student"])
    values.update({k: o["depth"]["student"] for k, o in (r.get("others") or {}).items() if o.get("depth")})
    crop = f", inside the Eigen crop (rows {d['eval_crop'][0]}-{d['eval_crop'][1]}, columns " \
           f"{d['eval_crop'][2]}-{d['eval_crop'][3]})" if d.get("eval_crop") else ""
    head = "".join(f"<th>{label}</th>" for _, label in DEPTH_COLUMNS)
    rows = "".join(f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{_fmt(values[key][k])}</td>"
                                                                  for k, _ in DEPTH_COLUMNS) + "</tr>"
                   for key, label in columns(r) if key in values)
    pictures = "\n".join(_img(folder / f) for f in d.get("figures", []) if (folder / f).is_file())
    return (f"<h2>Depth probe</h2><p class='muted'>BatchNorm + linear head to 256 depth bins (0.001-"
            f"{d['max_depth']:g} m) on the frozen last block's patch tokens and class token (the paper's head), "
            f"{d['steps']} steps, trained on {d['train_images']} images, scored on {d['val_images']} {d['split']} "
            f"images (test-time flip), per image over pixels with ground truth below {d['max_depth']:g} m{crop}, "
            f"then averaged.</p><table><tr><th></th>{head}</tr>{rows}</table>"
            f"<p class='muted'>image | ground truth | teacher | student (metres; black: no measurement)</p>{pictures}")


HELD_OUT_RULE = ("Only rows measured on images the student never trained on (and the cost rows) are marked; a row "
                 "that includes training images says how many.")


def _legend(r: dict) -> str:
    if len(columns(r)) > 2:
        return ("Green: the best of the models on that row. Every model is measured against the same teacher's "
                "TTA-denoised features and judged by the teacher's own outlier threshold. " + HELD_OUT_RULE)
    return "Green: the student is better than its teacher on that row; red: worse. " + HELD_OUT_RULE


def ttr_section(r: dict) -> str:
    """Which register neurons the test-time registers move (from eval.json's `ttr`), when the eval has them."""
    t = r.get("ttr")
    if not t:
        return ""
    neurons = ", ".join(f"block {b}: {u}" for b, u in t["neurons"].items()) or "none"
    found = t.get("found") or {}
    how = (f"found on {found.get('images', '?')} of these images ({found['outliers']['rule']})"
           if t.get("source") == "found" and found else f"read from {html.escape(str(t.get('source')))}")
    return (f"<h2>Test-time registers</h2><p>{t['count']} register neurons ({html.escape(neurons)}), {how}; their "
            "activations move onto one extra, zero-initialised token at inference (Jiang et al., 2025). Stock timm "
            "alone does not apply this: the model is phreg's, with hooks.</p>")


def artifact_section(r: dict) -> str:
    """Outliers in both tails per block (where they appear), for every model the eval measured."""
    tails = r.get("norm_tails")
    if not tails:
        return ""
    cols = columns(r)
    per = {"teacher": tails["per_block"]["teacher"], "student": tails["per_block"]["student"]}
    for key, other in (r.get("others") or {}).items():
        if other.get("norm_tails"):
            per[key] = other["norm_tails"]["per_block"]["student"]
    cols = [(k, label) for k, label in cols if k in per]
    head = "".join(f"<th>{html.escape(label)}: high</th><th>low</th>" for _, label in cols)
    body = "".join(f"<tr><td>{b}</td>" + "".join(f"<td>{_fmt(per[k][b]['high'])}</td><td>{_fmt(per[k][b]['low'])}</td>"
                                                 for k, _ in cols) + "</tr>"
                   for b in range(len(per["teacher"])))
    return (f"<h2>Outliers per block, both tails</h2><p class='muted'>{html.escape(tails['rule'])}: the fraction of "
            f"patch tokens above (high) and below (low), at the output of every block.</p>"
            f"<table><tr><th>block</th>{head}</tr>{body}</table>")


def _pictures_heading(r: dict) -> str:
    cols = columns(r)
    if len(cols) > 2:
        return "One row per model (" + ", ".join(html.escape(label) for _, label in cols) + "), same images"
    return "Teacher (top) vs student (bottom), same images"
