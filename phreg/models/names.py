"""What a user names a model with, checked before torch loads: a timm name, `local-dir:` / `hf-hub:`, an export or a
run folder, a weights file, a resolution that fits the patch size. Torch-free (timm is imported only to look a name
up in its registry or to build a model on the meta device)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from ..errors import UsageError
from ..files.paths import check_file

# The names people know a model by elsewhere -> timm's name for the same network and weights. Only names for which
# timm has exactly one model: DINOv2 and DINOv3 as torch.hub names them (DINOv3's ConvNeXts are not ViTs: left out),
# open_clip's `MODEL:PRETRAINED` pairs (its `list_pretrained(as_str=True)` spelling) whose weights timm holds under a
# tag, with QuickGELU where open_clip's weights use it, and the Hugging Face ids of the same weights. Lookups ignore
# case. `tests/test_model_names.py` checks every target against timm's registry (patch size and width on "meta").
MODEL_ALIASES = {
    # DINOv2, torch.hub.load("facebookresearch/dinov2", NAME)
    "dinov2_vits14": "vit_small_patch14_dinov2", "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vitl14": "vit_large_patch14_dinov2", "dinov2_vitg14": "vit_giant_patch14_dinov2",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2", "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2", "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2",
    # DINOv3, torch.hub.load("facebookresearch/dinov3", NAME)
    "dinov3_vits16": "vit_small_patch16_dinov3", "dinov3_vits16plus": "vit_small_plus_patch16_dinov3",
    "dinov3_vitb16": "vit_base_patch16_dinov3", "dinov3_vitl16": "vit_large_patch16_dinov3",
    "dinov3_vith16plus": "vit_huge_plus_patch16_dinov3", "dinov3_vit7b16": "vit_7b_patch16_dinov3",
    # OpenAI CLIP on the Hugging Face Hub (transformers' CLIPModel ids), and open_clip's `openai` weights
    "openai/clip-vit-base-patch16": "vit_base_patch16_clip_quickgelu_224.openai",
    "openai/clip-vit-base-patch32": "vit_base_patch32_clip_quickgelu_224.openai",
    "openai/clip-vit-large-patch14": "vit_large_patch14_clip_quickgelu_224.openai",
    "openai/clip-vit-large-patch14-336": "vit_large_patch14_clip_quickgelu_336.openai",
    "ViT-B-16:openai": "vit_base_patch16_clip_quickgelu_224.openai",
    "ViT-B-16-quickgelu:openai": "vit_base_patch16_clip_quickgelu_224.openai",
    "ViT-B-32:openai": "vit_base_patch32_clip_quickgelu_224.openai",
    "ViT-B-32-quickgelu:openai": "vit_base_patch32_clip_quickgelu_224.openai",
    "ViT-L-14:openai": "vit_large_patch14_clip_quickgelu_224.openai",
    "ViT-L-14-quickgelu:openai": "vit_large_patch14_clip_quickgelu_224.openai",
    "ViT-L-14-336:openai": "vit_large_patch14_clip_quickgelu_336.openai",
    "ViT-L-14-336-quickgelu:openai": "vit_large_patch14_clip_quickgelu_336.openai",
    # OpenCLIP (LAION, DataComp), open_clip pairs and the Hugging Face ids of the LAION-2B weights
    "ViT-B-16:laion400m_e32": "vit_base_patch16_clip_224.laion400m_e32",
    "ViT-B-16:laion2b_s34b_b88k": "vit_base_patch16_clip_224.laion2b",
    "laion/CLIP-ViT-B-16-laion2B-s34B-b88K": "vit_base_patch16_clip_224.laion2b",
    "ViT-B-16:datacomp_xl_s13b_b90k": "vit_base_patch16_clip_224.datacompxl",
    "ViT-B-32:laion400m_e32": "vit_base_patch32_clip_quickgelu_224.laion400m_e32",
    "ViT-B-32-quickgelu:laion400m_e32": "vit_base_patch32_clip_quickgelu_224.laion400m_e32",
    "ViT-B-32:datacomp_xl_s13b_b90k": "vit_base_patch32_clip_224.datacompxl",
    "ViT-L-14:laion400m_e32": "vit_large_patch14_clip_224.laion400m_e32",
    "ViT-L-14:laion2b_s32b_b82k": "vit_large_patch14_clip_224.laion2b",
    "laion/CLIP-ViT-L-14-laion2B-s32B-b82K": "vit_large_patch14_clip_224.laion2b",
    "ViT-L-14:datacomp_xl_s13b_b90k": "vit_large_patch14_clip_224.datacompxl",
    "ViT-H-14:laion2b_s32b_b79k": "vit_huge_patch14_clip_224.laion2b",
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": "vit_huge_patch14_clip_224.laion2b",
    "ViT-bigG-14:laion2b_s39b_b160k": "vit_gigantic_patch14_clip_224.laion2b",
    "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k": "vit_gigantic_patch14_clip_224.laion2b",
    # MetaCLIP and Apple DFN (QuickGELU, as open_clip builds them)
    "ViT-B-16:metaclip_400m": "vit_base_patch16_clip_quickgelu_224.metaclip_400m",
    "ViT-B-16-quickgelu:metaclip_400m": "vit_base_patch16_clip_quickgelu_224.metaclip_400m",
    "ViT-B-16:metaclip_fullcc": "vit_base_patch16_clip_quickgelu_224.metaclip_2pt5b",
    "ViT-B-16-quickgelu:metaclip_fullcc": "vit_base_patch16_clip_quickgelu_224.metaclip_2pt5b",
    "ViT-B-32:metaclip_400m": "vit_base_patch32_clip_quickgelu_224.metaclip_400m",
    "ViT-B-32-quickgelu:metaclip_400m": "vit_base_patch32_clip_quickgelu_224.metaclip_400m",
    "ViT-B-32:metaclip_fullcc": "vit_base_patch32_clip_quickgelu_224.metaclip_2pt5b",
    "ViT-B-32-quickgelu:metaclip_fullcc": "vit_base_patch32_clip_quickgelu_224.metaclip_2pt5b",
    "ViT-L-14:metaclip_400m": "vit_large_patch14_clip_quickgelu_224.metaclip_400m",
    "ViT-L-14-quickgelu:metaclip_400m": "vit_large_patch14_clip_quickgelu_224.metaclip_400m",
    "ViT-L-14:metaclip_fullcc": "vit_large_patch14_clip_quickgelu_224.metaclip_2pt5b",
    "ViT-L-14-quickgelu:metaclip_fullcc": "vit_large_patch14_clip_quickgelu_224.metaclip_2pt5b",
    "ViT-L-14:dfn2b": "vit_large_patch14_clip_quickgelu_224.dfn2b",
    "ViT-L-14-quickgelu:dfn2b": "vit_large_patch14_clip_quickgelu_224.dfn2b",
    "apple/DFN2B-CLIP-ViT-L-14": "vit_large_patch14_clip_quickgelu_224.dfn2b",
    "ViT-H-14:metaclip_fullcc": "vit_huge_patch14_clip_quickgelu_224.metaclip_2pt5b",
    "ViT-H-14-quickgelu:metaclip_fullcc": "vit_huge_patch14_clip_quickgelu_224.metaclip_2pt5b",
    "ViT-H-14:dfn5b": "vit_huge_patch14_clip_quickgelu_224.dfn5b",
    "ViT-H-14-quickgelu:dfn5b": "vit_huge_patch14_clip_quickgelu_224.dfn5b",
    "apple/DFN5B-CLIP-ViT-H-14": "vit_huge_patch14_clip_quickgelu_224.dfn5b",
    "ViT-H-14-378:dfn5b": "vit_huge_patch14_clip_quickgelu_378.dfn5b",
    "ViT-H-14-378-quickgelu:dfn5b": "vit_huge_patch14_clip_quickgelu_378.dfn5b",
    "apple/DFN5B-CLIP-ViT-H-14-378": "vit_huge_patch14_clip_quickgelu_378.dfn5b",
    "ViT-bigG-14:metaclip_fullcc": "vit_gigantic_patch14_clip_quickgelu_224.metaclip_2pt5b",
}
_ALIASES_LOWER = {k.lower(): v for k, v in MODEL_ALIASES.items()}


def timm_name(name: str, what: str = "model.name") -> str:
    """The timm name of what a user typed: an alias's target, said in one line on stderr, or the name as it is (a
    timm name, a prefixed one, a folder that exists)."""
    target = _ALIASES_LOWER.get(name.lower())
    if target is None or Path(name).exists():
        return name
    print(f"{what} {name} is timm's {target}", file=sys.stderr)
    return target


def close_aliases(name: str, n: int = 3) -> list[str]:
    """The aliases closest to a name that is neither an alias nor a timm name (difflib, case ignored)."""
    import difflib

    close = difflib.get_close_matches(name.lower(), list(_ALIASES_LOWER), n=n, cutoff=0.6)
    spelled = {k.lower(): k for k in MODEL_ALIASES}
    return [spelled[c] for c in close]


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
        close = close_aliases(spec)
        raise UsageError(f"{what} {spec}: no such folder" + (f", nor a model name; closest: {', '.join(close)}"
                                                              if close else ""))


MODEL_PREFIXES = ("local-dir", "hf-hub")  # model.name = PREFIX:WHERE; anything else is a timm name


def check_model_name(name: str, checkpoint: str | None = None) -> None:
    """`model.name`'s prefix and `local-dir:` folder, and `model.checkpoint`: what `distill` checks before torch is
    imported and `load_teacher` checks again for every caller that comes without the CLI (tests, benchmarks, ttr)."""
    if ":" in name and name.split(":", 1)[0] not in MODEL_PREFIXES:
        close = close_aliases(name)
        if close:  # an open_clip MODEL:PRETRAINED pair, misspelt
            raise UsageError(f"model.name {name!r} is not a model name phreg knows; closest: {', '.join(close)}")
        raise UsageError(f"model.name {name!r}: only the prefixes local-dir: and hf-hub: are understood")
    if name.startswith("local-dir:") and not Path(name.removeprefix("local-dir:")).is_dir():
        raise UsageError(f"model.name {name}: no such folder")
    check_file(checkpoint, "model.checkpoint", weights=True)


def unknown_model(name: str, what: str) -> UsageError:
    """`what 'vit_smal_patch14_dinov2' is not a timm model; closest: vit_small_patch14_dinov2, ...`: the closest
    among timm's names and the aliases (`MODEL_ALIASES`), so that `dinov2_vits41` is pointed at `dinov2_vits14`."""
    import difflib

    import timm

    base = name if name.lower() in _ALIASES_LOWER else name.split(".")[0]
    spelled = {k.lower(): k for k in MODEL_ALIASES} | {m.lower(): m for m in timm.list_models()}
    close = difflib.get_close_matches(base.lower(), list(spelled), n=3, cutoff=0.6)
    hint = f"; closest: {', '.join(spelled[c] for c in close)}" if close else "; see timm.list_models('*vit*')"
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
