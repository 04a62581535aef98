"""Publish a finished run on the Hugging Face Hub, loadable with `timm.create_model('hf-hub:OWNER/NAME')`.

`stage` builds the exact folder that is uploaded: the run's export (`model.safetensors`, `config.json`), its resolved
`recipe.yaml`, a model card `README.md`, and `eval.png` when the run has an eval report. `--dry-run DIR` writes that
folder and stops; `push` sends it as ONE commit through huggingface_hub's public API. The token is left to
huggingface_hub (`HF_TOKEN`, then the cached login) and never handed to anything that prints or writes.
The run folder is only ever read.
"""

from __future__ import annotations

import http
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors
import yaml

from .. import __version__
from ..errors import UsageError
from .export import CONFIG, TEXT_FILE, WEIGHTS, read_metadata
from ..files import atomic_dir, replaceable

RECIPE, CARD, FIGURE = "recipe.yaml", "README.md", "eval.png"
FILES = (WEIGHTS, CONFIG, RECIPE, CARD, FIGURE, TEXT_FILE)
EVAL_SCHEMA = "phreg.eval/"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TAGS = ["phreg", "registers", "image-feature-extraction", "timm", "vision-transformer"]
# The Hub's rules for one path segment: letters, digits, '-', '_', '.', no '--' or '..', no leading/trailing '-'/'.'.
NAME = r"(?!.*(?:--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID = re.compile(rf"{NAME}/{NAME}")


class PushError(RuntimeError):
    """The Hub refused or could not be reached (after retries): one line, exit code 1. Never carries the token."""


@dataclass
class Run:
    """What a card is made of, read (never written) from a run folder."""
    path: Path
    recipe: object  # phreg.recipe.Recipe
    summary: dict | None
    config: dict
    metadata: dict
    geometry: dict  # from the student as timm builds it: prefix tokens, grid, width
    eval: dict | None
    figure: Path | None


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id):
        raise UsageError(f"--repo-id {repo_id!r}: expected OWNER/NAME (letters, digits, '-', '_', '.'), "
                         "e.g. alice/dinov2-small-reg4")
    return repo_id


def read_run(run: str | Path) -> Run:
    """Check that `run` holds a finished export that loads in stock timm, and gather what the card says."""
    from ..recipe import load_recipe, recipe_hash

    run = Path(run)
    if not run.is_dir():
        raise UsageError(f"run folder {run} not found")
    if not (run / RECIPE).is_file():
        raise UsageError(f"{run} is not a phreg run folder (no {RECIPE})")
    export = run / "export"
    missing = [n for n in (WEIGHTS, CONFIG) if not (export / n).is_file()]
    if missing:
        raise UsageError(f"{run} has no finished export ({export / missing[0]} is missing); finish the run with "
                         f"`phreg distill {run / RECIPE} output_dir={run} --resume` (a finished run whose export "
                         f"was removed: `phreg export {run}`)")
    import timm  # only now: the cheap checks above answer in a fraction of a second

    from ..backbones import backbone
    from ..distill.unlock import resolve_patterns
    from ..models import _first_line

    try:  # what timm's strict load checks, without reading the weights: the architecture on "meta", the header
        metadata = read_metadata(export / WEIGHTS)  # a truncated or foreign file fails here
        config = json.loads((export / CONFIG).read_text())
        student = timm.create_model(f"local-dir:{export}", pretrained=False, device="meta")
        with safetensors.safe_open(str(export / WEIGHTS), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors, JSON and timm raise many types
        raise UsageError(f"the export in {export} does not load: {_first_line(e)}; "
                         f"rebuild it with `phreg export {run}`") from None
    wanted = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    if shapes != wanted:
        key = sorted(set(shapes) ^ set(wanted)) or [k for k in wanted if shapes[k] != wanted[k]]
        raise UsageError(f"the export in {export} does not load: {WEIGHTS} does not fit {CONFIG} (first difference: "
                         f"{key[0]}); rebuild it with `phreg export {run}`")
    recipe = load_recipe(run / RECIPE)
    if metadata.get("recipe_hash") not in (None, recipe_hash(recipe)):
        raise UsageError(f"{export / WEIGHTS} was made from another recipe than {run / RECIPE} "
                         f"(hash {metadata['recipe_hash']} vs {recipe_hash(recipe)}); rebuild it with "
                         f"`phreg export {run}`")
    unlocked = [(names, g.lr_scale) for g in recipe.train.unlock if (names := resolve_patterns(student, g.params))]
    family, init = backbone(student), recipe.model.register_init
    geometry = dict(family.geometry(student), unlocked=unlocked,
                    init=family.default_init(student) if init == "auto" else init)  # what `auto` resolved to
    summary = _read_json(run / "summary.json") if (run / "summary.json").is_file() else None
    if summary is None or str(summary.get("steps")) != metadata.get("steps"):  # `phreg export` of a stopped run
        said = "no summary.json" if summary is None else f"summary.json says step {summary.get('steps')}"
        raise UsageError(f"{run} has not finished: its export is of step {metadata.get('steps')}, {said}; finish "
                         f"the run with `phreg distill {run / RECIPE} output_dir={run} --resume` before publishing")
    report, figure = read_eval(run / "eval")
    return Run(run, recipe, summary, config, metadata, geometry, report, figure)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return data


def read_eval(folder: Path) -> tuple[dict | None, Path | None]:
    """`RUN/eval/eval.json` (schema phreg.eval/1) and its first figure, or (None, None) when the run has no eval."""
    path = folder / "eval.json"
    if not path.is_file():
        return None, None
    report = _read_json(path)
    rows = report.get("summary")
    if not str(report.get("schema", "")).startswith(EVAL_SCHEMA) or not isinstance(rows, list) or \
            not all(isinstance(r, dict) and "metric" in r for r in rows):
        raise UsageError(f"{path} is not a phreg eval report (expected schema {EVAL_SCHEMA}1 with a summary list); "
                         "rerun `phreg eval`")
    figures = report.get("figures") or []
    if not figures:
        return report, None
    figure = (folder / str(figures[0])).resolve()
    if not figure.is_relative_to(folder.resolve()) or not figure.is_file():
        raise UsageError(f"{path}: figure {figures[0]!r} is not a file inside {folder}; rerun `phreg eval`")
    with open(figure, "rb") as f:
        if f.read(8) != PNG_MAGIC:
            raise UsageError(f"{path}: figure {figures[0]!r} is not a PNG image")
    return report, figure


# ------------------------------------------------------------------------------------------------------ model card

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


def _num(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


HARDWARE_METRICS = {"images_per_s"}  # speeds of one machine at one moment: shown, never judged


def eval_table(report: dict) -> str:
    """The eval summary, teacher vs student; the better value of each row in bold, except for hardware-dependent
    rows (images/s), which are shown as measured without a verdict."""
    lines = ["| metric | teacher | student | better |", "| --- | ---: | ---: | --- |"]
    for row in report["summary"]:
        t, s, better = row.get("teacher"), row.get("student"), row.get("better")
        if row.get("metric") in HARDWARE_METRICS or row.get("note") == "hardware-dependent":
            better = "hardware-dependent, no verdict"
        cells = [_num(t), _num(s)]
        if isinstance(t, (int, float)) and isinstance(s, (int, float)) and better in ("lower", "higher") and t != s:
            best = int((s < t) == (better == "lower"))  # 1: the student wins
            cells[best] = f"**{cells[best]}**"
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


def eval_lead(report: dict) -> str:
    """Which images the eval table was measured on: dataset folder, count, probe split."""
    ds = report.get("dataset") or {}
    where = f" from `{_folder(ds['images'])}`" if ds.get("images") else ""
    text = f"Teacher vs student on {report.get('images', '?')} images{where} (`phreg eval`)"
    if ds.get("probe_val"):
        text += f"; linear probe trained on {ds['probe_train']} and scored on {ds['probe_val']} of them " \
                f"({ds.get('split_rule')}), masks from `{_folder(ds['masks'])}`"
    return text + ". Rows marked hardware-dependent are timings of one machine, not a property of the model."


def model_card(run: Run, repo_id: str) -> str:
    """README.md: YAML front matter the Hub indexes, then what was done, on what data, from which weights, the eval
    when there is one, limitations, usage and the citation. `base_model` only when the weights are the Hub's."""
    r, g, summary = run.recipe, run.geometry, run.summary or {}
    hub_id, license = base_model(r.model.name, run.config)
    weights_text, from_hub = weights_line(r.model.name, hub_id, summary.get("weights"))
    front = dict(library_name="timm", pipeline_tag="image-feature-extraction")
    if hub_id and from_hub:
        front["base_model"] = (summary.get("weights") or {}).get("hub_id") or hub_id
    if license and from_hub:  # a local file's license is whatever its maker chose: not ours to assert
        front["license"] = license
    front["tags"] = TAGS
    teacher = (hub_id if from_hub else None) or r.model.name
    size = r.model.img_size
    steps = summary.get("steps", run.metadata.get("steps", "–"))
    unlocked = "; ".join(", ".join(f"`{p}`" for p in names) + (f" at {scale:g}x lr" if scale != 1 else "")
                         for names, scale in g["unlocked"])
    batch = r.train.batch_size * r.train.grad_accum * ((summary.get("hardware") or {}).get("processes") or 1)
    regs = summary.get("registers") or dict(present=g["registers"] - r.model.registers, added=r.model.registers,
                                             total=g["registers"])
    reg_text = f"{regs['added']} added (init: {g['init']})" + (
        f", {regs['present']} already in the teacher: {regs['total']} in total" if regs["present"] else "")
    train_text, held_text = data_lines(summary.get("data"), summary)
    head = run.metadata.get("head") or ("drop" if run.config.get("num_classes") == 0 else "keep")
    rows = [
        ("teacher weights", weights_text),
        *([("license", f"not set: the weights are not the Hub checkpoint (timm lists `{license}` for that one); "
                       "the local file's own terms apply")] if license and not from_hub else []),
        ("training data", train_text),
        ("held-out set", held_text),
        ("resolution", f"{size} x {size} px ({g['patches']} patches of {g['patch']} px)"),
        ("registers", reg_text),
        ("views per image", f"{r.views.num} (shifts up to {r.views.max_shift:.0%} of the grid, flip p={r.views.flip})"),
        ("trained parameters", unlocked),
        ("optimizer", f"AdamW, lr {r.train.lr:g} -> {r.train.end_lr:g} ({r.train.schedule}), batch {batch}"),
        ("steps", f"{steps} ({summary['images_seen']} images seen)" if "images_seen" in summary else str(steps)),
        ("classifier head", "dropped (`num_classes=0`: the model returns features)" if head == "drop"
         else "the teacher's, kept as it was (not trained)"),
        ("wall time", _wall_time(summary)),
        ("hardware", _hardware(summary.get("hardware"))),
        ("phreg", f"{run.metadata.get('phreg_version', __version__)}, recipe hash "
                  f"`{run.metadata.get('recipe_hash', '–')}` ([recipe.yaml](recipe.yaml))"),
    ]
    heldout = summary.get("heldout")
    if heldout:
        n = ((summary.get("data") or {}).get("heldout") or {}).get("images")
        on = f" on the {n} held-out image{'s' if n != 1 else ''}" if n else ""
        rows.append(("held-out distance", f"mean 1 - cos to denoised teacher features{on}: teacher "
                                          f"{_num(heldout.get('teacher'))}, student {_num(heldout.get('student'))}"))
    name = repo_id.split("/")[1]
    tokens = g["prefix"] + g["patches"]
    prefix_words = ("class, " if g["class_token"] else "") + f"{g['registers']} registers"
    prefix_short = "class and register" if g["class_token"] else "register"
    present = f" (it already had {regs['present']}: {regs['total']} in total)" if regs["present"] else ""
    parts = [
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---",
        f"# {name}",
        f"`{teacher}` with **{regs['added']} register tokens added after the fact**{present} by PH-Reg "
        f"self-distillation ([Chen et al., 2025, *Vision Transformers with Self-Distilled Registers*]({PAPER})), "
        f"made with phreg. It is a stock timm `{g['model_class']}` ({g['registers']} registers, "
        "`no_embed_class=True`): no extra code is needed to use it." + (
            "" if from_hub else " The teacher's weights came from a local file, not from the Hub checkpoint (file "
                                "name and sha256 below)."),
        "## What was done",
        "The student is the teacher's own network with fresh register tokens. It was trained to reproduce the "
        "teacher's *denoised* patch features: each training image is seen in several shifted and mirrored views, the "
        "frozen teacher's features of every view are mapped back to the original patch grid and averaged, which "
        "cancels the artifacts tied to positions. Only the parameters listed below were trained, on (1 - cosine) + "
        "MSE over patch tokens; the rest is the teacher, unchanged.",
        "| setting | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {_cell(v)} |" for k, v in rows),
    ]
    if run.eval is not None:
        parts += ["## Evaluation", eval_lead(run.eval), eval_table(run.eval)]
        if run.figure is not None:
            parts.append(f"![teacher vs student]({FIGURE})")
        if "zeroshot" in run.eval:
            parts.append(zeroshot_table(run.eval["zeroshot"]))
    data = (summary.get("data") or {}).get("train") or {}
    small = data.get("images") is not None and data["images"] < 1000
    parts += [
        "## Limitations",
        "\n".join([
            f"- Trained on {data['images']} images only: a demonstration, not a general-purpose model; the features "
            "are checked against the teacher on the images above, not on a benchmark." if small else
            "- The features were checked against the teacher on the images named above, not on a public benchmark.",
            "- The student learns to match the teacher's denoised features: it inherits the teacher's biases and "
            "cannot know more than the teacher; the class token and any classifier head are not trained for a task.",
            f"- {regs['added']} extra tokens cost compute: about {100 * regs['added'] / tokens:.0f}% more tokens per "
            "image at this resolution (see the GFLOPs row of the evaluation when present).",
            "- Timings (images/s, wall time) depend on the machine that measured them.",
        ] + ([] if from_hub else ["- The teacher weights are a local file, not the Hub checkpoint: compare the "
                                  "sha256 above before assuming they are."])),
        "## Usage",
        f"""```python
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
```""",
        "Other resolutions: `timm.create_model(..., pretrained=True, dynamic_img_size=True)`.",
        *(clip_usage(repo_id, r.model, size // g["patch"]) if r.model.text_model else []),
        "## Files",
        f"- `{WEIGHTS}`, `{CONFIG}`: the student in timm's Hub layout\n"
        f"- `{RECIPE}`: the resolved phreg recipe it was trained with (`phreg distill {RECIPE}`; local paths in it "
        "are those of the training machine)" + (f"\n- `{FIGURE}`: a figure from the eval report" if run.figure else "")
        + (f"\n- `{TEXT_FILE}`: CLIP's text tower (open_clip `{r.model.text_model}`), for zero-shot use"
           if r.model.text_model else ""),
        "## Citation",
        f"PH-Reg: [arXiv:2505.21501]({PAPER})\n\n```bibtex\n{BIBTEX}\n```",
    ]
    return "\n\n".join(parts) + "\n"


def zeroshot_table(z: dict) -> str:
    """Zero-shot segmentation, per class, teacher vs student (from `phreg eval --classes`)."""
    t, s = z["teacher"], z["student"]
    lines = [f"Zero-shot segmentation on {z['images']} images (teacher through {t['head']}, student through "
             f"{s['head']}; {z['text_model']} text tower, 80 ImageNet templates):", "",
             "| class | teacher IoU | student IoU |", "| --- | ---: | ---: |",
             f"| **mIoU** | {_num(t['miou'])} | {_num(s['miou'])} |"]
    lines += [f"| {_cell(n)} | {_num(t['per_class_iou'][n])} | {_num(s['per_class_iou'][n])} |" for n in t["per_class_iou"]]
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


# ------------------------------------------------------------------------------------------------ staging, upload

def stage(run: Run, repo_id: str, folder: Path) -> list[str]:
    """Fill `folder` with exactly what is uploaded; returns the file names."""
    shutil.copyfile(run.path / "export" / WEIGHTS, folder / WEIGHTS)
    shutil.copyfile(run.path / "export" / CONFIG, folder / CONFIG)
    if (run.path / "export" / TEXT_FILE).is_file():
        shutil.copyfile(run.path / "export" / TEXT_FILE, folder / TEXT_FILE)
    shutil.copyfile(run.path / RECIPE, folder / RECIPE)
    (folder / CARD).write_text(model_card(run, repo_id))
    if run.figure is not None:
        shutil.copyfile(run.figure, folder / FIGURE)
    return sorted(p.name for p in folder.iterdir())


def dry_run(run: str | Path, repo_id: str, out: str | Path) -> list[str]:
    """Write the upload folder to `out` (atomically) and upload nothing."""
    repo_id, out, path = check_repo_id(repo_id), Path(out), Path(run)
    if out.resolve().is_relative_to(path.resolve()) or path.resolve().is_relative_to(out.resolve()):
        raise UsageError(f"--dry-run {out}: choose a folder outside the run folder {path} (it is never modified)")
    if not replaceable(out, set(FILES)):
        raise UsageError(f"--dry-run {out} exists and is not an earlier dry run; choose a new folder")
    info = read_run(run)
    with atomic_dir(out) as tmp:
        names = stage(info, repo_id, tmp)
    return names


def _transient(e: BaseException) -> bool:
    """Worth another try: connection problems, timeouts, HTTP 408/429/5xx. Never offline mode or a 4xx."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return False
    if isinstance(e, HfHubHTTPError):
        status = getattr(e.response, "status_code", 0) or 0
        return status in (408, 429) or status >= 500
    names = {c.__name__ for c in type(e).__mro__}  # httpx's TransportError, requests' ConnectionError / Timeout
    return isinstance(e, (ConnectionError, TimeoutError)) or bool(names & {"TransportError", "Timeout"})


def _cause(e: BaseException, endpoint: str, secret: str | None) -> str:
    """One line saying why, with the token (should a server ever echo it) blanked out."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        text = "HF_HUB_OFFLINE is set; unset it to push"
    elif isinstance(e, HfHubHTTPError) and getattr(e.response, "status_code", None):
        status = e.response.status_code
        try:
            text = f"{status} {http.HTTPStatus(status).phrase}"
        except ValueError:
            text = f"HTTP {status}"
        if e.server_message:
            text += f": {e.server_message.strip().splitlines()[0][:200]}"
        if status in (401, 403):
            text += " (check HF_TOKEN or `hf auth login`, and that the token may write to this repo)"
    elif _transient(e):
        text = f"cannot reach {endpoint}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    else:
        text = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return text.replace(secret, "***") if secret else text


def push(run: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, endpoint: str | None = None, tries: int = 4, wait: float = 2.0,
         say=print) -> str:
    """Create the repo if missing, then upload the staged folder as one commit; returns the commit URL.

    Each Hub call is retried on transient errors, waiting `wait`, 2 `wait`, 4 `wait`, ... seconds. Retrying the
    commit is safe: files that reached the Hub are recognised by their hash and not committed twice.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    repo_id = check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint)  # no token argument: huggingface_hub finds it (HF_TOKEN, cached login)
    try:
        secret = get_token()
    except Exception:  # e.g. a failed OIDC exchange; huggingface_hub reports it again on the first call
        secret = None
    if not secret:  # before the run is read (timm): the commonest mistake answers at once
        raise UsageError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or try --dry-run DIR first)")
    info = read_run(run)
    where = api.endpoint or constants.ENDPOINT

    def call(what: str, fn):
        for attempt in range(1, tries + 1):
            try:
                return fn()
            except Exception as e:  # anything the Hub or the network throws ends as one line
                if attempt == tries or not _transient(e):
                    again = f", {attempt} tries" if attempt > 1 else ""
                    raise PushError(f"push to {repo_id} failed ({what}{again}): {_cause(e, where, secret)}") from None
                pause = wait * 2 ** (attempt - 1)
                say(f"{what}: {_cause(e, where, secret)}; retrying in {pause:g} s ({attempt}/{tries - 1})")
                time.sleep(pause)

    steps = info.metadata.get("steps", "?")
    message = commit_message or (f"phreg {__version__}: {info.recipe.model.name} + {info.geometry['registers']} "
                                 f"registers, {steps} steps")
    with tempfile.TemporaryDirectory(prefix="phreg-push-") as tmp:
        names = stage(info, repo_id, Path(tmp))
        call("create repo", lambda: api.create_repo(repo_id, private=True if private else None, exist_ok=True))
        if revision and revision != "main" and not revision.startswith("refs/"):
            call("create branch", lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
        commit = call("commit", lambda: api.create_commit(
            repo_id, operations=[CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(Path(tmp) / n)) for n in names],
            commit_message=message, revision=revision))
    say(f"pushed {', '.join(names)} to {repo_id}" + (f"@{revision}" if revision else ""))
    return getattr(commit, "commit_url", None) or f"{where}/{repo_id}"
