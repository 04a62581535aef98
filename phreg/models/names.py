"""What a user names a model with, checked before torch loads: a timm name, `local-dir:` / `hf-hub:`, an export or a
run folder, a weights file, a resolution that fits the patch size. Torch-free (timm is imported only to look a name
up in its registry or to build a model on the meta device)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import UsageError
from ..files.paths import check_file


def check_model_spec(spec: str, what: str = "model") -> None:
    """A run folder, an export folder, a local-dir:/hf-hub: name or a timm name (the name itself is checked later,
    against timm's registry)."""
    path = Path(spec)
    if path.is_dir():
        if (path / "recipe.yaml").is_file() and not (path / "export" / "config.json").is_file():
            raise UsageError(f"{path} is a phreg run without a finished export (run it to the end, or `phreg export`)")
        if not (path / "recipe.yaml").is_file() and not (path / "config.json").is_file():
            raise UsageError(f"{what} {path} is neither a phreg run nor a timm export folder (no config.json)")
        return
    if spec.startswith("local-dir:") and not Path(spec.removeprefix("local-dir:")).is_dir():
        raise UsageError(f"{what} {spec}: no such folder")
    if ":" not in spec and (os.sep in spec or spec.startswith(".")):
        raise UsageError(f"{what} {spec}: no such folder")


MODEL_PREFIXES = ("local-dir", "hf-hub")  # model.name = PREFIX:WHERE; anything else is a timm name


def check_model_name(name: str, checkpoint: str | None = None) -> None:
    """`model.name`'s prefix and `local-dir:` folder, and `model.checkpoint`: what `distill` checks before torch is
    imported and `load_teacher` checks again for every caller that comes without the CLI (tests, benchmarks, ttr)."""
    if ":" in name and name.split(":", 1)[0] not in MODEL_PREFIXES:
        raise UsageError(f"model.name {name!r}: only the prefixes local-dir: and hf-hub: are understood")
    if name.startswith("local-dir:") and not Path(name.removeprefix("local-dir:")).is_dir():
        raise UsageError(f"model.name {name}: no such folder")
    check_file(checkpoint, "model.checkpoint", weights=True)


def unknown_model(name: str, what: str) -> UsageError:
    """`what 'vit_smal_patch14_dinov2' is not a timm model; closest: vit_small_patch14_dinov2, ...`."""
    import difflib

    import timm

    base = name.split(".")[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else "; see timm.list_models('*vit*')"
    return UsageError(f"{what} {name!r} is not a timm model{hint}")


def check_architecture(cfg, views=None) -> None:
    """`model.name` against timm's registry and `model.img_size` against its patch size (and, given them, the
    recipe's `views`), on the meta device (no weights, no network; timm's import costs seconds): the recipe's own
    mistakes, said before anything about the folder it writes to. What else can be wrong with the model is said by
    the loader, in its own words."""
    import timm

    check_model_name(cfg.name, cfg.checkpoint)
    if cfg.name.startswith("hf-hub:"):  # its architecture is in a config on the Hub: checked when it loads
        return
    if ":" not in cfg.name and not timm.is_model(cfg.name):
        raise unknown_model(cfg.name, "model.name")
    try:
        model = timm.create_model(cfg.name, pretrained=False, device="meta")
    except Exception:  # a folder timm cannot read, a family phreg does not distill: the loader's words
        return
    if hasattr(model, "patch_embed"):
        check_img_size(model, cfg.img_size, views)


def check_img_size(model, img_size: int, views=None) -> None:
    """The resolution against a built model's patch size (a meta-device model will do: no weights are read), and,
    given the recipe's `views`, against the views: a grid on which no view is shifted or mirrored is refused."""
    p = model.patch_embed.patch_size[0]
    if img_size % p:
        lo, hi = (img_size // p) * p, (img_size // p + 1) * p
        raise UsageError(f"model.img_size={img_size} is not a multiple of the patch size {p}; "
                         f"nearest valid sizes: {', '.join(str(s) for s in (lo, hi) if s > 0)}")
    if views is not None:
        check_view_grid(img_size // p, p, views)


def smallest_shifting_grid(max_shift: float) -> int | None:
    """The smallest patch grid on which `views.max_shift` shifts a view at all: round(max_shift x grid) >= 1 (as
    `phreg.targets.views.sample_plan` rounds); None for max_shift 0."""
    if max_shift <= 0:
        return None
    g = max(1, math.floor(0.5 / max_shift))
    while round(max_shift * g) < 1:
        g += 1
    return g


def check_view_grid(grid: int, patch: int, views) -> None:
    """Refuse a recipe whose teacher views are all the image itself (nothing to average, so nothing is denoised):
    a grid too small for `views.max_shift` to shift, and mirroring off or impossible (a one-patch-wide grid)."""
    shifts = round(views.max_shift * grid) >= 1
    mirrors = views.flip > 0 and grid > 1
    if views.num < 2 or shifts or mirrors:
        return
    g = smallest_shifting_grid(views.max_shift)
    why = ("can be neither shifted nor mirrored" if grid == 1 else
           f"are not shifted (views.max_shift={views.max_shift:g}) nor mirrored (views.flip=0)")
    fix = (f"views.max_shift={views.max_shift:g} first shifts on a {g}x{g} grid: model.img_size={g * patch} or more"
           if g else "views.max_shift=0 never shifts: set it (e.g. 0.15)")
    raise UsageError(f"model.img_size={grid * patch} gives a {grid}x{grid} patch grid (patch {patch}): the teacher's "
                     f"views {why}, so every view is the image and nothing is denoised; {fix}")
