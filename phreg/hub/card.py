"""The model card: a run's record as the Hub shows it (YAML front matter the Hub indexes, then what was done, on what
data, from which weights, the eval, limitations, usage and the citation).

Pure functions of a `Run` (read by `publish.read_run`): no file is written and nothing leaves the machine here, so the
card can be checked without a Hub or a network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import __version__
from ..eval.tables import best as best_of, cell, columns, hardware_dependent, number, winner, zeroshot_iou_rows
from ..run.folder import CONFIG, RECIPE, TEXT_FILE, WEIGHTS
from ..run.training_list import overlap_line
from .transformers import ARCHITECTURE as HF_CLASS, FILES as HF_FILES

CARD, FIGURE = "README.md", "eval.png"
TAGS = ["phreg", "registers", "image-feature-extraction", "timm", "vision-transformer"]


@dataclass
class Run:
    """What a card is made of, read (never written) from a run folder."""
    path: Path
    recipe: object  # phreg.config.recipe.Recipe
    summary: dict | None
    config: dict
    metadata: dict
    geometry: dict  # from the student as timm builds it: prefix tokens, grid, width
    eval: dict | None
    figure: Path | None


def base_model(name: str, config: dict) -> tuple[str | None, str | None]:
    """The teacher's Hub id and license: `timm/vit_small_patch14_dinov2.lvd142m`, `apache-2.0`. A local-dir
    teacher has no public id; a plain timm name without a Hub copy is given as is."""
    from timm.models import get_pretrained_cfg

    license = config.get("pretrained_cfg", {}).get("license")
    if name.startswith("hf-hub:"):
        return name.removeprefix("hf-hub:").split("@")[0], license
    if name.startswith("local-dir:"):
        return None, license
    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # unknown or malformed names: timm raises several types
        cfg = None
    return (cfg.hf_hub_id if cfg and cfg.hf_hub_id else name), license or (cfg.license if cfg else None)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def eval_table(report: dict) -> str:
    """The eval summary, teacher vs student; the better value in bold on rows measured on never-trained images alone
    (`phreg.eval.tables.held_out`), none on the others or on hardware-dependent rows (images/s), which are shown as
    measured."""
    cols = columns(report)
    if len(cols) > 2:  # teacher, test-time registers, student, both: a column each, the best in bold
        lines = ["| metric | " + " | ".join(_cell(label) for _, label in cols) + " | better |",
                 "| --- |" + " ---: |" * len(cols) + " --- |"]
        for row in report["summary"]:
            better = "hardware-dependent, no verdict" if hardware_dependent(row) else row.get("better")
            top = best_of(row, [k for k, _ in cols])
            cells = [f"**{number(cell(row, k))}**" if k in top else number(cell(row, k)) for k, _ in cols]
            lines.append(f"| {_cell(row.get('label') or row['metric'])} | " + " | ".join(cells)
                         + f" | {_cell(better or '')} |")
        return "\n".join(lines)
    lines = ["| metric | teacher | student | better |", "| --- | ---: | ---: | --- |"]
    for row in report["summary"]:
        better = "hardware-dependent, no verdict" if hardware_dependent(row) else row.get("better") or row.get("note")
        cells = [number(row.get("teacher")), number(row.get("student"))]
        best = winner(row)
        if best is not None:
            i = int(best == "student")
            cells[i] = f"**{cells[i]}**"
        lines.append(f"| {_cell(row.get('label') or row['metric'])} | {cells[0]} | {cells[1]} | "
                     f"{_cell(better or '')} |")
    return "\n".join(lines)


def _duration(seconds) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _wall_time(summary: dict) -> str:
    """The whole run, with the part spent filling the target cache named when there was one."""
    t = summary.get("timings") or {}
    if not t:
        return _duration(summary.get("wall_s"))
    cache = f" ({_duration(t['cache_s'])} of it computing cached teacher targets)" if t.get("cache_s", 0) >= 1 else ""
    return _duration(t.get("total_s")) + cache


def _hardware(hw: dict | None) -> str:
    if not hw:
        return "–"
    device = str(hw.get("device", ""))
    precision = {"no": "fp32"}.get(str(hw.get("precision")), hw.get("precision"))
    if device.startswith("cuda"):
        what = f"{hw.get('processes', 1)} x {hw.get('name') or 'GPU'}"
    else:
        what = f"CPU ({hw.get('torch_threads', '?')} threads)"
    return f"{what}, {precision}"


PAPER = "https://arxiv.org/abs/2505.21501"
BIBTEX = """@article{chen2025phreg,
  title   = {Vision Transformers with Self-Distilled Registers},
  author  = {Chen, Yinjie and Yan, Zipeng and Zhou, Chong and Dai, Bo and Luo, Andrew F.},
  journal = {arXiv preprint arXiv:2505.21501},
  year    = {2025}
}"""


def weights_line(name: str, hub_id: str | None, weights: dict | None) -> tuple[str, bool]:
    """Where the teacher's weights came from, and whether they are the Hub's (only then is `base_model` set)."""
    if not weights:
        return f"`{name}`; weights origin not recorded (no summary.json in the run)", False
    if weights.get("source") == "hub":
        rev = f" at revision `{weights['revision'][:12]}`" if weights.get("revision") else ""
        return f"[`{weights['hub_id']}`](https://huggingface.co/{weights['hub_id']}){rev} (the Hub checkpoint)", True
    if weights.get("source") in ("file", "local-dir"):
        sha = f" (sha256 `{weights['sha256']}`)" if weights.get("sha256") else ""
        hub = f" `{hub_id}`" if hub_id and hub_id != name else ""
        return f"`{name}` architecture, weights from the file `{Path(str(weights.get('file'))).name}`{sha}; " \
               f"local weights: not the hub checkpoint{hub}", False
    return f"`{name}` from {weights.get('url') or 'an unrecorded source'}", False


def data_lines(data: dict | None, summary: dict) -> tuple[str, str]:
    """(training data, held-out set) as the card states them."""
    if not data:
        return "not recorded (no summary.json data section)", "–"
    t, h = data["train"], data["heldout"]
    if t.get("dataset"):
        count = f": {t['images']} images" if t.get("images") else " (streamed; not counted)"
        train = f"{t['kind']} dataset `{t['dataset']}`{count}"
        held = f"{h['images']} images ({h.get('source') or 'held out'})" if h.get("images") else "none"
        return train, held
    if t.get("embedded"):
        names = ", ".join(t.get("names") or [])
        train = f"the photos embedded in phreg (`phreg/photos`, public domain / CC0): {t['images']} images ({names})"
    else:
        train = f"folder `{_folder(t['folder'])}`: {t['images']} images"
    train += f"; file-list sha256 `{t['file_list_sha256'][:16]}`"
    if not h.get("images"):
        held = "none"
    elif h.get("folder"):
        held = f"{h['images']} images from folder `{_folder(h['folder'])}` (data.val_root), never trained on"
    else:
        names = f" ({', '.join(h['names'])})" if h.get("names") else ""
        held = f"{h['images']} image{'s' if h['images'] != 1 else ''}{names} held out of the training folder " \
               f"({h.get('source')}), never trained on"
    return train, held


def _folder(path: str) -> str:
    """A dataset folder as people name it, without the machine's absolute path: `camvid_subset/images`."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


PROBES = (("linear probe", "masks", "probe"), ("depth probe", "depth", "depth"))  # name, its labels, its section


def eval_lead(report: dict) -> str:
    """Which images the eval table was measured on: dataset folder or benchmark, count, the probes' split."""
    ds = report.get("dataset") or {}
    if ds.get("title"):  # a benchmark layout (`phreg eval --dataset KIND:DIR`)
        text = (f"Teacher vs student on the {report.get('images', '?')} {ds.get('val_name', 'val')} images of "
                f"{ds['title']} (`phreg eval --dataset {ds.get('kind')}`)")
        if ds.get("probe_val"):
            text += f"; probes trained on its {ds['probe_train']} train images ({ds.get('split_rule')})"
    else:
        where = f" from `{_folder(ds['images'])}`" if ds.get("images") else ""
        text = f"Teacher vs student on {report.get('images', '?')} images{where} (`phreg eval`)"
        if ds.get("probe_val"):
            ran = [(name, key) for name, key, metric in PROBES if ds.get(key) and metric in report] \
                or [("linear probe", "masks")]  # a report without its metrics' sections: the masks' probe
            probes = " and ".join(name for name, _ in ran)
            sources = ", ".join(f"{key} from `{_folder(ds[key])}`" for _, key in ran if ds.get(key))
            text += f"; {probes} trained on {ds['probe_train']} and scored on {ds['probe_val']} of them " \
                    f"({ds.get('split_rule')}), {sources}"
    seen = report.get("training_overlap")
    if seen:
        text += f". Training overlap: {overlap_line(seen)}" + (
            f"; the first row is scored on the {len(seen['unseen'])} never trained on"
            if seen["recorded"] and 0 < len(seen["unseen"]) < seen["images"] else "")
    return text + (". Bold marks the better side only on rows measured on images the student never trained on (and "
                   "on the cost rows); a row that includes training images says how many. Rows marked "
                   "hardware-dependent are timings of one machine, not a property of the model.")


def model_card(run: Run, repo_id: str, transformers: dict | None = None, timm: bool = True) -> str:
    """README.md: YAML front matter the Hub indexes, then what was done, on what data, from which weights, the eval
    when there is one, limitations, usage and the citation. `base_model` only when the weights are the Hub's.

    `transformers`: what `hub.transformers.write_transformers` measured when the upload holds that format too
    (`subfolder` None: at the root, instead of timm's, which `timm=False` says)."""
    f = Facts.of(run)
    parts = ["---\n" + yaml.safe_dump(_front_matter(f, timm, transformers), sort_keys=False) + "---",
             f"# {repo_id.split('/')[1]}", _intro(f, timm, transformers),
             "## What was done",
             "The student is the teacher's own network with fresh register tokens. It was trained to reproduce the "
             "teacher's *denoised* patch features: each training image is seen in several shifted and mirrored views, "
             "the frozen teacher's features of every view are mapped back to the original patch grid and averaged, "
             "which cancels the artifacts tied to positions. Only the parameters listed below were trained, on "
             "(1 - cosine) + MSE over patch tokens; the rest is the teacher, unchanged.",
             "| setting | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {_cell(v)} |" for k, v in _settings(f))]
    if run.eval is not None:
        parts += ["## Evaluation", eval_lead(run.eval), eval_table(run.eval)]
        if run.figure is not None:
            parts.append(f"![teacher vs student]({FIGURE})")
        if "zeroshot" in run.eval:
            parts.append(zeroshot_table(run.eval["zeroshot"]))
    parts += ["## Limitations", _limitations(f), "## Usage", *_usage(f, repo_id, timm, transformers),
              "## Files", _files(f, timm, transformers),
              "## Citation", f"PH-Reg: [arXiv:2505.21501]({PAPER})\n\n```bibtex\n{BIBTEX}\n```"]
    return "\n\n".join(parts) + "\n"


@dataclass
class Facts:
    """What the card says about a run, worked out once from its recipe, summary, export metadata and geometry."""
    run: Run
    hub_id: str | None
    license: str | None
    weights_text: str
    from_hub: bool
    regs: dict  # registers present in the teacher, added, total

    @classmethod
    def of(cls, run: Run) -> "Facts":
        r, g, summary = run.recipe, run.geometry, run.summary or {}
        hub_id, license = base_model(r.model.name, run.config)
        weights_text, from_hub = weights_line(r.model.name, hub_id, summary.get("weights"))
        regs = summary.get("registers") or dict(present=g["registers"] - r.model.registers, added=r.model.registers,
                                                 total=g["registers"])
        return cls(run, hub_id, license, weights_text, from_hub, regs)

    @property
    def summary(self) -> dict:
        return self.run.summary or {}

    @property
    def teacher(self) -> str:
        return (self.hub_id if self.from_hub else None) or self.run.recipe.model.name


def _front_matter(f: Facts, timm: bool, transformers: dict | None) -> dict:
    front = dict(library_name="timm" if timm else "transformers", pipeline_tag="image-feature-extraction")
    if f.hub_id and f.from_hub:
        front["base_model"] = (f.summary.get("weights") or {}).get("hub_id") or f.hub_id
    if f.license and f.from_hub:  # a local file's license is whatever its maker chose: not ours to assert
        front["license"] = f.license
    front["tags"] = (TAGS if timm else [t for t in TAGS if t != "timm"]) + (["transformers"] if transformers else [])
    return front


def _intro(f: Facts, timm: bool, transformers: dict | None) -> str:
    g, regs = f.run.geometry, f.regs
    present = f" (it already had {regs['present']}: {regs['total']} in total)" if regs["present"] else ""
    return (f"`{f.teacher}` with **{regs['added']} register tokens added after the fact**{present} by PH-Reg "
            f"self-distillation ([Chen et al., 2025, *Vision Transformers with Self-Distilled Registers*]({PAPER})), "
            f"made with phreg. " + (f"It is a stock timm `{g['model_class']}` ({g['registers']} registers, "
                                    "`no_embed_class=True`): no extra code is needed to use it." if timm else
                                    f"It is a stock Hugging Face transformers `{HF_CLASS}` ({g['registers']} "
                                    "registers), converted exactly from phreg's timm student: no extra code is needed "
                                    "to use it.")
            + (f" The same student is also in `{transformers['subfolder']}/` as a transformers `{HF_CLASS}`."
               if timm and transformers else "") + (
                "" if f.from_hub else " The teacher's weights came from a local file, not from the Hub checkpoint "
                                      "(file name and sha256 below)."))


def _settings(f: Facts) -> list[tuple[str, str]]:
    """The card's settings table: (setting, value) rows."""
    run, r, g, summary, regs = f.run, f.run.recipe, f.run.geometry, f.summary, f.regs
    size = r.model.img_size
    steps = summary.get("steps", run.metadata.get("steps", "–"))
    unlocked = "; ".join(", ".join(f"`{p}`" for p in names) + (f" at {scale:g}x lr" if scale != 1 else "")
                         for names, scale in g["unlocked"])
    processes = (summary.get("hardware") or {}).get("processes") or 1
    batch = r.train.batch_size * r.train.grad_accum * processes
    images = ((summary.get("data") or {}).get("train") or {}).get("images")
    batch_text = f"batch {batch}" if not images or images >= r.train.batch_size * processes else \
        f"batch {images} (train.batch_size {r.train.batch_size}, clipped to the {images} training images)"
    reg_text = f"{regs['added']} added (init: {g['init']})" + (
        f", {regs['present']} already in the teacher: {regs['total']} in total" if regs["present"] else "")
    train_text, held_text = data_lines(summary.get("data"), summary)
    head = run.metadata.get("head") or ("drop" if run.config.get("num_classes") == 0 else "keep")
    dtype = run.metadata.get("dtype", "float32")  # exports that predate the key are float32
    rows = [
        ("teacher weights", f.weights_text),
        *([("license", f"not set: the weights are not the Hub checkpoint (timm lists `{f.license}` for that one); "
                       "the local file's own terms apply")] if f.license and not f.from_hub else []),
        ("training data", train_text),
        ("held-out set", held_text),
        ("resolution", f"{size} x {size} px ({g['patches']} patches of {g['patch']} px)"),
        ("registers", reg_text),
        ("views per image", f"{r.views.num} (shifts up to {r.views.max_shift:.0%} of the grid, flip p={r.views.flip})"),
        ("trained parameters", unlocked),
        ("optimizer", f"AdamW, lr {r.train.lr:g} -> {r.train.end_lr:g} ({r.train.schedule}), {batch_text}"),
        ("steps", f"{steps} ({summary['images_seen']} images seen)" if "images_seen" in summary else str(steps)),
        ("classifier head", "dropped (`num_classes=0`: the model returns features)" if head == "drop"
         else "the teacher's, kept as it was (not trained)"),
        ("weights stored in", dtype if dtype == "float32" else
         f"{dtype} (timm copies them exactly into its float32 model; `model.to(torch.{dtype})` keeps them in {dtype})"),
        ("wall time", _wall_time(summary)),
        ("hardware", _hardware(summary.get("hardware"))),
        ("phreg", f"{run.metadata.get('phreg_version', __version__)}, recipe hash "
                  f"`{run.metadata.get('recipe_hash', '–')}` ([recipe.yaml](recipe.yaml))"),
    ]
    if summary.get("heldout"):
        rows.append(("held-out distance", heldout_text(f)))
    return rows


def heldout_text(f: Facts) -> str:
    """The run's own held-out score, with what it was measured with (views, resolution, images); when the card also
    has an eval, why the eval's distances for the same images differ (its own views, drawn again)."""
    r, held = f.run.recipe, f.summary["heldout"]
    n = ((f.summary.get("data") or {}).get("heldout") or {}).get("images")
    on = f" on the {n} held-out image{'s' if n != 1 else ''}" if n else ""
    text = (f"teacher {number(held.get('teacher'))}, student {number(held.get('student'))}: mean 1 - cos to the "
            f"teacher's denoised features{on}, scored as training ended with the recipe's {r.views.num} views per "
            f"image at {r.model.img_size} px")
    e = f.run.eval
    if e and e.get("views"):
        text += (f". The evaluation below scores {e.get('images', '?')} images again with its own {e['views']} "
                 f"views per image at {e.get('img_size', '?')} px (other shifts and mirrors, so other denoised "
                 "targets): an image scored in both has two distances; compare teacher with student within one "
                 "of them, not across")
    return text


def _limitations(f: Facts) -> str:
    g, regs = f.run.geometry, f.regs
    data = (f.summary.get("data") or {}).get("train") or {}
    small = data.get("images") is not None and data["images"] < 1000
    before = g["prefix"] + g["patches"] - regs["added"]  # the teacher's tokens: class, its registers, patches
    return "\n".join([
        f"- Trained on {data['images']} images only: a demonstration, not a general-purpose model; the features "
        "are checked against the teacher on the images above, not on a benchmark." if small else
        "- The features were checked against the teacher on the images named above, not on a public benchmark.",
        "- The student learns to match the teacher's denoised features: it inherits the teacher's biases and "
        "cannot know more than the teacher; the class token and any classifier head are not trained for a task.",
        f"- {regs['added']} extra tokens cost compute: about {100 * regs['added'] / before:.0f}% more tokens per "
        "image at this resolution (see the GFLOPs row of the evaluation when present).",
        "- Timings (images/s, wall time) depend on the machine that measured them.",
    ] + ([] if f.from_hub else ["- The teacher weights are a local file, not the Hub checkpoint: compare the "
                                "sha256 above before assuming they are."]))


def _usage(f: Facts, repo_id: str, timm: bool, transformers: dict | None) -> list[str]:
    r, g = f.run.recipe, f.run.geometry
    size, tokens = r.model.img_size, g["prefix"] + g["patches"]
    prefix_words = ("class, " if g["class_token"] else "") + f"{g['registers']} registers"
    prefix_short = "class and register" if g["class_token"] else "register"
    timm_usage = [f"""```python
import timm
import torch
from PIL import Image

model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()
config = timm.data.resolve_data_config({{}}, model=model)  # {size} px, the model's own mean/std
transform = timm.data.create_transform(**config)
x = transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0)
with torch.no_grad():
    tokens = model.forward_features(x)         # (1, {tokens}, {g['width']}): {prefix_words}, patches
patches = tokens[:, model.num_prefix_tokens:]  # drop the {prefix_short} tokens: (1, {g['patches']}, {g['width']})
```""", "Other resolutions: `timm.create_model(..., pretrained=True, dynamic_img_size=True)`."]
    return [*([] if timm else transformers_usage(repo_id, transformers, g)),
            *(timm_usage if timm else []),
            *(clip_usage(repo_id, r.model, size // g["patch"]) if r.model.text_model else []),
            *(transformers_usage(repo_id, transformers, g) if timm and transformers else [])]


def _files(f: Facts, timm: bool, transformers: dict | None) -> str:
    r, run = f.run.recipe, f.run
    return ((f"- `{WEIGHTS}`, `{CONFIG}`: the student in timm's Hub layout\n" if timm else "")
            + (transformers_files(transformers) if transformers else "")
            + f"- `{RECIPE}`: the resolved phreg recipe it was trained with (`phreg distill {RECIPE}`; local paths in "
            "it are those of the training machine)" + (f"\n- `{FIGURE}`: a figure from the eval report"
                                                       if run.figure else "")
            + (f"\n- `{TEXT_FILE}`: CLIP's text tower (open_clip `{r.model.text_model}`), for zero-shot use"
               if r.model.text_model else ""))


def zeroshot_table(z: dict) -> str:
    """Zero-shot segmentation, per class, teacher vs student (from `phreg eval --classes`)."""
    t, s = z["teacher"], z["student"]
    lines = [f"Zero-shot segmentation on {z['images']} images (teacher through {t['head']}, student through "
             f"{s['head']}; {z['text_model']} text tower, 80 ImageNet templates):", "",
             "| class | teacher IoU | student IoU |", "| --- | ---: | ---: |"]
    for r in zeroshot_iou_rows(z):
        label = f"**{_cell(r['label'])}**" if r.get("total") else _cell(r["label"])
        lines.append(f"| {label} | {number(r['teacher'])} | {number(r['student'])} |")
    return "\n".join(lines)


def clip_usage(repo_id: str, m, grid: int) -> list[str]:
    """Dense CLIP features through the MaskCLIP head, and zero-shot with the shipped text tower."""
    return [
        "Dense, text-aligned features through the MaskCLIP head (what this student was trained on) and zero-shot "
        "segmentation with the shipped text tower (with phreg installed):",
        f"""```python
import phreg
feats = phreg.dense_features(model, x, head="maskclip")  # (1, {grid}, {grid}, D): CLIP's embedding space
```
```bash
phreg segment hf-hub:{repo_id} --images DIR --classes classes.csv --out segmentation/
```""",
        f"The text tower alone, with open_clip: `clip = open_clip.create_model(\"{m.text_model}\")`, "
        f"`clip.load_state_dict(safetensors.torch.load_file(\"{TEXT_FILE}\"), strict=False)`, then "
        f"`clip.encode_text(open_clip.get_tokenizer(\"{m.text_model}\")(texts))`.",
    ]


def _diff(d: float) -> str:
    return "0 (bit-identical)" if d == 0 else f"{d:.1e}"


def transformers_files(t: dict) -> str:
    folder = f"{t['subfolder']}/" if t.get("subfolder") else ""
    return f"- {', '.join(f'`{folder}{n}`' for n in HF_FILES)}: the student as a transformers `{HF_CLASS}` and its " \
           "image processor\n"


def transformers_usage(repo_id: str, t: dict, g: dict) -> list[str]:
    """Loading the student with transformers' AutoModel and AutoImageProcessor (the folder `t['subfolder']` when the
    repository holds timm's format at its root), and what was measured against timm."""
    sub = f', subfolder="{t["subfolder"]}"' if t.get("subfolder") else ""
    size, tokens = t["img_size"], g["prefix"] + g["patches"]
    return [
        "With Hugging Face transformers (>= 4.48, no phreg or timm needed):",
        f"""```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("{repo_id}"{sub})  # {size} px, the run's mean/std
model = AutoModel.from_pretrained("{repo_id}"{sub}).eval()  # {HF_CLASS}
inputs = processor(images=Image.open("image.jpg").convert("RGB"), return_tensors="pt")
with torch.no_grad():
    tokens = model(**inputs).last_hidden_state  # (1, {tokens}, {g['width']}): class, registers, patches
patches = tokens[:, 1 + model.config.num_register_tokens:]  # (1, {g['patches']}, {g['width']})
```""",
        f"`last_hidden_state` equals timm's `forward_features` to float32 rounding: max |diff| {_diff(t['max_diff'])} "
        f"on random {size} px inputs, measured with transformers {t['transformers']} when this upload was made"
        + ("" if t.get("dtype", "float32") == "float32" else
           f", both computing in float32 from the stored {t['dtype']} weights (transformers 5 keeps {t['dtype']} "
           f"unless given `dtype=torch.float32`)") + ". "
        f"At other sizes (multiples of "
        f"{g['patch']} px) both libraries resample the patch position embeddings alike (bicubic, antialiased).",
    ]
