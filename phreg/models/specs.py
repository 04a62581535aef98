"""What a user names a model by, resolved: a timm name (with a checkpoint file), a local-dir: / hf-hub: name, a timm
export folder or a phreg run folder (its export, at the run's resolution), and the base model a run was distilled
from. `inspect`, `eval` and `segment` take any of these; `Loaded` carries what they need besides the network.

The spec's shape (a run without an export, a folder that is neither, a path that is not there) is checked by
`phreg.models.names.check_model_spec`, which the CLI has called already; here it runs again for callers without the CLI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from ..config.recipe import ModelCfg, load_recipe
from .loading import load_teacher, normalization
from .names import check_model_spec, timm_name, unknown_model


@dataclass
class Loaded:
    """A model resolved from a user's spec, with what evaluating it needs."""
    model: torch.nn.Module
    name: str
    img_size: int
    mean: tuple
    std: tuple
    run: Path | None = None  # the phreg run it came from, if any


def run_recipe(run: Path):
    return load_recipe(run / "recipe.yaml")


def load_spec(spec: str, img_size: int | None = None, checkpoint: str | None = None) -> Loaded:
    """Any model a user can name: timm name (+ checkpoint file), local-dir:/hf-hub:, an export folder, a run folder.

    Resolution defaults to the run's recipe, else the export's own input size, else 224.
    """
    spec = timm_name(spec, "model")
    check_model_spec(spec)
    path = Path(spec)
    run = None
    if path.is_dir() and (path / "recipe.yaml").is_file():
        run, path = path, path / "export"
        img_size = img_size or run_recipe(run).model.img_size
    if path.is_dir():
        spec = f"local-dir:{path}"
        if img_size is None:
            img_size = json.loads((path / "config.json").read_text())["pretrained_cfg"]["input_size"][-1]
    elif ":" not in spec and not timm.is_model(spec):
        raise unknown_model(spec, "model")
    img_size = img_size or 224
    cfg = ModelCfg(name=spec, checkpoint=checkpoint, img_size=img_size)
    model = load_teacher(cfg)
    mean, std = normalization(model, cfg)
    return Loaded(model, str(run or spec), img_size, mean, std, run)


def load_run_teacher(run: Path, img_size: int | None = None) -> Loaded:
    """The base model a run was distilled from, with its weights, as its recipe names them."""
    m = run_recipe(run).model
    cfg = ModelCfg(name=m.name, checkpoint=m.checkpoint, img_size=img_size or m.img_size, mean=m.mean, std=m.std)
    model = load_teacher(cfg)
    mean, std = normalization(model, cfg)
    return Loaded(model, m.name, cfg.img_size, mean, std)
