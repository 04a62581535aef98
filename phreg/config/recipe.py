"""Recipes: plain data (YAML) checked against typed dataclasses.

Every key has a type and, where it matters, a range or a set of choices. A recipe with an unknown key, a value of the
wrong type or an impossible value is rejected with one line naming the key (`UsageError`, exit code 2), before any
model is built. Defaults here are the paper's DINOv2 settings unless a comment says otherwise; the files in
`recipes/` spell every key out with a comment.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..errors import UsageError
from ..files.atomic import write_atomic


def opt(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, **checks):
    """A field with checks: choices=(...), ge=, gt=, le=, lt=."""
    return field(default=default, default_factory=factory, metadata=checks)


HEADS = ("final", "last_block", "naclip", "maskclip")  # dense heads, see phreg/backbones/heads.py


@dataclass
class ModelCfg:
    name: str = "vit_small_patch14_dinov2"
    checkpoint: Optional[str] = None
    img_size: int = opt(224, gt=0)
    registers: int = opt(16, ge=0)
    register_init: str = opt("auto", choices=("auto", "pos_mean", "class_token", "register_mean", "grey_patch", "zeros",
                                              "randn"))
    register_noise: float = opt(0.02, ge=0)
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    teacher_head: str = opt("final", choices=HEADS)  # how the teacher's targets are read (phreg.backbones.heads)
    student_head: str = opt("final", choices=HEADS)  # which student output learns them
    teacher_ttr: str = "none"  # targets read with test-time registers: none, find, or a sidecar (phreg.ttr)
    naclip_sigma: float = opt(5.0, gt=0)  # NACLIP's Gaussian neighbourhood width, in patches
    text_model: Optional[str] = None  # open_clip model name of the text tower (CLIP family); None = no zero-shot
    text_pretrained: Optional[str] = None  # open_clip pretrained tag, used when model.checkpoint is no whole CLIP


@dataclass
class DataCfg:
    root: Optional[str] = None
    val_root: Optional[str] = None
    val_split: float = opt(0.0, ge=0, lt=1)
    val_limit: int = opt(0, ge=0)
    resize: int = opt(0, ge=0)
    num_workers: int = opt(2, ge=0)


@dataclass
class ViewsCfg:
    num: int = opt(10, ge=1)
    max_shift: float = opt(0.15, ge=0, le=0.5)
    flip: float = opt(0.5, ge=0, le=1)
    candidates: int = opt(64, ge=1)
    fill: Union[str, list[float]] = "white"
    chunk: int = opt(0, ge=0)  # 0 = as many views per forward as memory allows


@dataclass
class CacheCfg:
    enabled: bool = False
    plans: int = opt(4, ge=1)
    dtype: str = opt("float16", choices=("float16", "float32"))
    dir: Optional[str] = None


@dataclass
class SpeedCfg:
    fused_attn: bool = True
    compile: Union[bool, str] = "auto"
    compile_mode: str = opt("default", choices=("default", "reduce-overhead", "max-autotune",
                                                "max-autotune-no-cudagraphs"))
    teacher_precision: str = opt("auto", choices=("auto", "bf16", "fp32"))
    grad_checkpointing: bool = False
    frozen_dtype: str = opt("fp32", choices=("fp32", "bf16"))


@dataclass
class UnlockGroup:
    params: list[str] = opt(factory=list)
    lr_scale: float = opt(1.0, gt=0)
    weight_decay: Optional[float] = opt(None, ge=0)


def paper_unlock() -> list[UnlockGroup]:
    """The paper's trainable subset, by semantic name (`phreg.distill.unlock`: each family says which parameters).
    `class_token` carries the class entry of the positional embedding once folded."""
    return [
        UnlockGroup(params=["registers", "class_token", "pos_embed"], lr_scale=1.0),
        UnlockGroup(params=["patch_embed", "last_block"], lr_scale=0.1),
    ]


@dataclass
class TrainCfg:
    epochs: int = opt(100, ge=1)
    max_steps: int = opt(0, ge=0)
    batch_size: int = opt(8, ge=1)
    grad_accum: int = opt(1, ge=1)
    lr: float = opt(1e-4, gt=0)
    end_lr: float = opt(5e-6, ge=0)
    schedule: str = opt("exp", choices=("exp", "cosine", "constant"))
    warmup_steps: int = opt(0, ge=0)
    weight_decay: float = opt(1e-2, ge=0)
    betas: list[float] = opt(factory=lambda: [0.9, 0.999])
    grad_clip: float = opt(1.0, ge=0)
    mse_weight: float = opt(1.0, ge=0)
    precision: str = opt("auto", choices=("auto", "bf16", "fp32"))
    unlock: list[UnlockGroup] = opt(factory=paper_unlock)
    max_nonfinite: int = opt(10, ge=0)
    max_nonfinite_share: float = opt(0.1, ge=0, le=1)
    log_every: int = opt(10, ge=1)
    eval_every: int = opt(0, ge=0)
    save_every: int = opt(500, ge=0)
    save_every_minutes: float = opt(10.0, ge=0)
    keep_last: int = opt(2, ge=1)
    trackers: list[str] = opt(factory=list)
    stop_signals: list[str] = opt(factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class ExportCfg:
    head: str = opt("drop", choices=("drop", "keep"))  # drop: num_classes=0, a feature extractor (what phreg trains)
    dtype: str = opt("auto", choices=("auto", "fp32", "bf16", "fp16"))  # auto: speed.frozen_dtype (hub/export.py)


@dataclass
class Recipe:
    output_dir: str = "runs/phreg"
    seed: int = 0
    model: ModelCfg = opt(factory=ModelCfg)
    data: DataCfg = opt(factory=DataCfg)
    views: ViewsCfg = opt(factory=ViewsCfg)
    cache: CacheCfg = opt(factory=CacheCfg)
    speed: SpeedCfg = opt(factory=SpeedCfg)
    train: TrainCfg = opt(factory=TrainCfg)
    export: ExportCfg = opt(factory=ExportCfg)

    def expand_paths(self) -> "Recipe":
        """`~` in every path key (a shell does not expand it inside `key=~/dir`)."""
        self.output_dir = os.path.expanduser(self.output_dir)
        for section, key in PATH_KEYS:
            value = getattr(getattr(self, section), key)
            if value is None:
                continue
            if value.startswith("local-dir:"):
                value = "local-dir:" + os.path.expanduser(value.removeprefix("local-dir:"))
            elif section != "model" or key != "name":
                value = os.path.expanduser(value)
            setattr(getattr(self, section), key, value)
        return self

    def check(self) -> None:
        """Rules that tie several keys together."""
        t, m = self.train, self.model
        if self.export.head == "drop" and m.student_head in ("naclip", "maskclip"):
            raise UsageError(f"recipe key export.head: drop would remove the projection head that the student's "
                             f"{m.student_head} output is read through; use keep")
        if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
            raise UsageError(f"recipe key train.betas: expected two numbers in [0, 1), got {t.betas}")
        if t.end_lr > t.lr:
            raise UsageError(f"recipe key train.end_lr: {t.end_lr} is above train.lr={t.lr}")
        if not t.unlock or not any(g.params for g in t.unlock):
            raise UsageError("recipe key train.unlock: at least one parameter pattern must be unlocked")
        for key in ("mean", "std"):
            v = getattr(m, key)
            if v is not None and (len(v) != 3 or (key == "std" and min(v) <= 0)):
                raise UsageError(f"recipe key model.{key}: expected three numbers (std > 0), got {v}")
        if self.speed.frozen_dtype == "bf16" and t.precision == "fp32":
            raise UsageError("recipe key speed.frozen_dtype: bf16 frozen weights need bf16 autocast; set "
                             "train.precision to bf16 or auto (bf16 on a GPU)")
        if isinstance(self.speed.compile, str) and self.speed.compile != "auto":
            raise UsageError(f"recipe key speed.compile: expected true, false or auto, got {self.speed.compile!r}")
        for name in t.trackers:
            if name not in TRACKERS:
                raise UsageError(f"recipe key train.trackers: expected some of {', '.join(TRACKERS)}, got {name!r}")
        for name in t.stop_signals:
            if name not in STOP_SIGNALS:
                raise UsageError(f"recipe key train.stop_signals: expected some of {', '.join(STOP_SIGNALS)}, got "
                                 f"{name!r} (Ctrl-C, SIGINT, is always handled)")
        fill = self.views.fill
        if isinstance(fill, str) and fill not in FILLS:
            raise UsageError(f"recipe key views.fill: expected one of {', '.join(FILLS)} or [r, g, b], got {fill!r}")
        if isinstance(fill, list) and len(fill) != 3:
            raise UsageError(f"recipe key views.fill: expected three numbers in [0, 1], got {fill}")
        if m.text_pretrained and not m.text_model:
            raise UsageError("recipe key model.text_pretrained: set model.text_model (the open_clip model name) too")


FILLS = ("white", "black", "mean")
# Accelerate's tracker names (`log_with`)
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT", "SIGXCPU")
PATH_KEYS = (("model", "name"), ("model", "checkpoint"), ("data", "root"), ("data", "val_root"), ("cache", "dir"))
# Names people reach for from other tools -> the key phreg uses; typo suggestions match against both.
ALIASES = {"learning_rate": "lr", "lr_end": "end_lr", "min_lr": "end_lr", "final_lr": "end_lr", "steps": "max_steps",
           "num_steps": "max_steps", "batch": "batch_size", "bs": "batch_size", "workers": "num_workers",
           "image_size": "img_size", "resolution": "img_size", "input_size": "img_size", "num_registers": "registers",
           "reg_tokens": "registers", "model_name": "name", "weights": "checkpoint", "pretrained": "checkpoint",
           "out": "output_dir", "output": "output_dir", "run_dir": "output_dir", "num_views": "num",
           "accumulate": "grad_accum", "gradient_accumulation_steps": "grad_accum", "clip": "grad_clip",
           "val": "val_root", "train_root": "root", "images": "root", "warmup": "warmup_steps"}


# ----------------------------------------------------------------------------------------------- parsing and checks

def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _convert(value: Any, tp, key: str, checks: dict):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, checks)
            except UsageError as e:
                errors.append(str(e).split(": ", 1)[1])
        raise UsageError(f"recipe key {key}: {' or '.join(errors)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UsageError(f"recipe key {key}: expected a list, got {value!r}")
        return [_convert(v, item, f"{key}[{i}]", {}) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise UsageError(f"recipe key {key}: expected {_type_name(tp)}, got {value!r}")
    if "choices" in checks and value not in checks["choices"]:
        raise UsageError(f"recipe key {key}: expected one of {', '.join(checks['choices'])}, got {value!r}")
    for op, ok, word in (("ge", value.__ge__, ">="), ("gt", value.__gt__, ">"),
                         ("le", value.__le__, "<="), ("lt", value.__lt__, "<")):
        if op in checks and not ok(checks[op]):
            raise UsageError(f"recipe key {key}: must be {word} {checks[op]}, got {value!r}")
    return value


def from_dict(cls, data: Any, prefix: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrongly typed values."""
    where = prefix or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"recipe key {where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for k in data:
        if k not in fields:
            close = suggest(str(k), list(fields))
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close}?)" if close else ""
            raise UsageError(f"unknown recipe key {prefix + '.' if prefix else ''}{k}{hint}; "
                             f"known: {', '.join(fields)}")
    kwargs = {k: _convert(v, hints[k], f"{prefix + '.' if prefix else ''}{k}", dict(fields[k].metadata))
              for k, v in data.items()}
    return cls(**kwargs)


def suggest(word: str, known: list[str]) -> str | None:
    """The known key closest to `word` (difflib), also through ALIASES: `lerning_rate` -> `lr`."""
    candidates = {k: k for k in known}
    candidates.update({alias: key for alias, key in ALIASES.items() if key in known})
    close = difflib.get_close_matches(word.lower(), list(candidates), n=1, cutoff=0.6)
    return candidates[close[0]] if close else None


def yaml_problem(e: Exception) -> str:
    """What PyYAML says went wrong and where (1-based), in one line: `found character '\\t' that cannot start
    any token (line 2, column 1)`."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    text = problem or str(e).strip().splitlines()[0]
    context = getattr(e, "context", None)
    if context and problem:
        text = f"{context}, {problem}"
    return text + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else "")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings; values are parsed as YAML (so `1e-4`, `null`, `[1, 1, 1]` work)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"override {item!r}: expected key=value, e.g. train.epochs=1")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise UsageError(f"override {item!r}: {p} is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return data


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file (None = all defaults), apply overrides, check everything."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        path = Path(os.path.expanduser(path))
        if not path.is_file():
            raise UsageError(f"recipe {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
            if "\x00" in text:
                raise UnicodeDecodeError("utf-8", raw, 0, 1, "NUL byte")
        except UnicodeDecodeError:
            kind = next((name for magic, name in BINARY_KINDS if raw.startswith(magic)), "a binary file")
            raise UsageError(f"recipe {path} is not a YAML text file (it is {kind}); pass a recipe such as "
                             "recipes/quickstart.yaml") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"recipe {path} is not valid YAML: {yaml_problem(e)}") from None
        if not isinstance(data, dict):
            raise UsageError(f"recipe {path}: expected a mapping of keys at the top level")
    data = apply_overrides(data, list(overrides))
    _migrate(data)
    recipe = from_dict(Recipe, data).expand_paths()
    recipe.check()
    return recipe


def _migrate(data: dict) -> None:
    """Recipes written before dense heads had `views.tap` (final | last_block): it read both sides the same way."""
    views, model = data.get("views"), data.get("model")
    if isinstance(views, dict) and "tap" in views and (model is None or isinstance(model, dict)):
        tap = views.pop("tap")
        model = data.setdefault("model", {}) if model is None else model
        model.setdefault("teacher_head", tap)
        model.setdefault("student_head", tap)


BINARY_KINDS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"PK\x03\x04", "a zip archive"),
                (b"\x93NUMPY", "a NumPy array"), (b"GIF8", "a GIF image"), (b"RIFF", "a RIFF (e.g. WebP) file"))


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_hash(recipe: Recipe) -> str:
    """A short fingerprint of everything that defines the run (not where it is written)."""
    d = to_dict(recipe)
    d.pop("output_dir")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    return write_atomic(path, yaml.safe_dump(to_dict(recipe), sort_keys=False))
