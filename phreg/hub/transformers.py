"""The student in Hugging Face transformers: a timm export -> a folder that `transformers.AutoModel.from_pretrained`
loads as `Dinov2WithRegistersModel`, computing the same function.

timm's student and transformers' DINOv2-with-registers differ in how they lay out the same computation:

* Position embeddings. The student adds them to the patch tokens only (`no_embed_class=True`: the class token's
  entry is folded into `cls_token`, `phreg.backbones.Backbone.fold_state`). transformers adds them to
  [class, patches] and then inserts the registers after the class token, without position. So the class token keeps
  its folded value and `position_embeddings[:, 0]` is zero: adding zero is exact, and transformers never resamples
  that entry (at other sizes it resamples only the patch grid). At the export's own size and a square input
  transformers uses its stored table as is (no resampling), hence the exact match there.
* Attention: timm's fused `qkv` is split in its (q, k, v) order; `proj` is `attention.output.dense`.
* SwiGLU (ViT-g): timm's `SwiGLUPacked` computes `silu(x1) * x2` of `fc1(x).chunk(2)`, gate first, which is exactly
  transformers' `weights_in` (its newer layout splits that into `gate_proj`, `up_proj` the same way on load).
* LayerScale `gamma` is `lambda1`; the final `norm` is `layernorm`; both libraries use exact GELU and eps 1e-6.

The weights are written with the names of the `facebook/dinov2-with-registers-*` checkpoints, which every
transformers since 4.48 loads (5.x converts them on load), in the timm export's dtype (config.json's `torch_dtype`
says which). The export checks itself: the folder is loaded back with `AutoModel` and `last_hidden_state` is compared
with timm's `forward_features` before it is moved into place, both in float32 from the weights as stored, so the
conversion is checked exactly whatever the dtype (rounding to bf16 is the timm export's too, not the conversion's).
transformers is an optional extra (`pip install 'phreg[transformers]'`), imported only here.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from pathlib import Path

from ..errors import Aborted, UsageError
from ..files.atomic import atomic_dir, replaceable, writing
from ..run.folder import RECIPE, require_run

ARCHITECTURE = "Dinov2WithRegistersModel"
WEIGHTS, CONFIG, PROCESSOR = "model.safetensors", "config.json", "preprocessor_config.json"
FILES = (WEIGHTS, CONFIG, PROCESSOR)
SUFFIX = "-transformers"  # `phreg export RUN --format transformers` writes RUN/export-transformers
SUBFOLDER = "transformers"  # a Hub repository holding both formats: timm's at its root (where timm reads), this here
TOLERANCE = 1e-4  # the largest max |last_hidden_state - forward_features| an export may have (measured: 0)
MIN_VERSION = "4.48"  # the first transformers with Dinov2WithRegistersModel
PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}


# ------------------------------------------------------------------------------------------------ what fits

def refusal(model) -> str | None:
    """Why this timm model has no transformers export, or None when it has one. Only the structure is read, so a
    model on the "meta" device will do (the teacher's layout is the student's).

    The layout is checked module by module, so the reason names what `Dinov2WithRegistersModel` lacks; a layout that
    fits but is not a DINOv2 (DeiT-III) is refused too: transformers would present it as a DINOv2."""
    reason = layout_refusal(model)
    if reason:
        return f"transformers' {ARCHITECTURE} cannot compute it exactly: {reason}"
    arch = model.pretrained_cfg.get("architecture") or type(model).__name__
    if "dinov2" not in arch:
        return f"{arch} is not a DINOv2; its layout fits, but transformers' one ViT with register tokens is " \
               f"{ARCHITECTURE}, DINOv2's class (preprocessing, documentation), and would present it as one"
    return None


def layout_refusal(model) -> str | None:
    """What in this timm model's layout `Dinov2WithRegistersModel` does not have, or None."""
    import torch.nn as nn
    from timm.layers import Attention, GluMlp, LayerScale, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        if getattr(model, "rope", None) is not None:
            return f"it is a timm {type(model).__name__} with rotary position embeddings (RoPE)"
        return f"it is a timm {type(model).__name__}, not a VisionTransformer"
    if model.cls_token is None:
        return "it has no class token (it pools with a MAP head), and transformers always puts one first"
    if model.pos_embed is None:
        return "it has no absolute positional embedding"
    if not isinstance(model.norm_pre, nn.Identity):
        return "it normalizes the tokens before the first block (CLIP's ln_pre)"
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.norm, nn.Identity) or pe.proj.bias is None \
            or pe.dynamic_img_pad or tuple(pe.proj.kernel_size) != tuple(pe.proj.stride) or any(pe.proj.padding):
        return "its patch embedding is not one strided conv with a bias"
    if pe.patch_size[0] != pe.patch_size[1] or pe.grid_size[0] != pe.grid_size[1]:
        return f"its patches or patch grid are not square ({ARCHITECTURE} keeps a square grid)"
    if not isinstance(model.norm, nn.LayerNorm):
        return "it has no final LayerNorm"
    for b in model.blocks:
        if type(b) is not Block or type(b.attn) is not Attention:
            return f"its blocks are timm {type(b).__name__} / {type(b.attn).__name__}, not pre-norm Block / Attention"
        a, mlp = b.attn, b.mlp
        if not all(isinstance(m, nn.Identity) for m in (a.q_norm, a.k_norm, a.norm)) or a.qkv.bias is None \
                or a.proj.bias is None or getattr(a, "gate", None) is not None:
            return "its attention normalizes or gates queries, keys or its output, or has no q/k/v or output bias"
        if a.num_heads * a.head_dim != model.embed_dim:
            return f"its attention is {a.num_heads} x {a.head_dim} wide, not {model.embed_dim}"
        if not all(isinstance(ls, LayerScale) for ls in (b.ls1, b.ls2)):
            return "its blocks have no LayerScale"
        if not all(isinstance(n, nn.LayerNorm) and n.eps == model.norm.eps for n in (b.norm1, b.norm2)):
            return "its norms do not share one LayerNorm eps"
        if type(mlp) is Mlp:
            if type(mlp.act) is not nn.GELU or mlp.act.approximate != "none":
                return f"its MLP activation is {type(mlp.act).__name__}, not exact GELU"
        elif type(mlp) is not GluMlp or type(mlp.act) is not nn.SiLU or mlp.gate_last:
            return f"its MLP is a timm {type(mlp).__name__}, neither GELU nor SwiGLU with the gate first"
        if not isinstance(mlp.norm, nn.Identity):
            return "its MLP has an inner norm"
        if mlp.fc1.bias is None or mlp.fc2.bias is None:
            return "its MLP has no biases"
    if len({b.mlp.fc2.in_features for b in model.blocks}) != 1 or mlp_ratio(model) is None:
        return f"its MLP width {model.blocks[0].mlp.fc2.in_features} is no integer mlp_ratio of the width, or varies"
    return None


def check_exportable(model, name: str, run: str | Path = "RUN") -> None:
    """One line (exit 2) when `model` cannot go to transformers exactly, pointing to the timm export of `run`."""
    reason = refusal(model)
    if reason:
        raise UsageError(f"no transformers export of {name}: {reason}; use the timm export: "
                         f"timm.create_model('local-dir:{run}/export', pretrained=True)")


def require_transformers():
    """The transformers module, or one line saying how to install it (it is an optional extra)."""
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is None or not hasattr(transformers, ARCHITECTURE):
        raise UsageError(f"the transformers format needs Hugging Face transformers>={MIN_VERSION}: "
                         "pip install 'phreg[transformers]'")
    return transformers


# ------------------------------------------------------------------------------------------------ the mapping

def mlp_ratio(model) -> int | None:
    """The integer `mlp_ratio` from which transformers rebuilds the student's MLP width, or None.

    transformers sizes its MLP as D * ratio; its SwiGLU keeps 2/3 of that rounded up to a multiple of 8
    (ViT-g: 1536 * 4 -> 4096 per branch, timm's packed fc1 of 8192 = 2 x 4096). Its config types the ratio int."""
    from timm.layers import GluMlp

    dim, hidden = model.embed_dim, model.blocks[0].mlp.fc2.in_features
    swiglu = type(model.blocks[0].mlp) is GluMlp
    for r in range(1, 17):
        if ((int(dim * r * 2 / 3) + 7) // 8 * 8 if swiglu else dim * r) == hidden:
            return r
    return None


def hf_config(model, dtype=None) -> dict:
    """config.json of `Dinov2WithRegistersModel` for a timm student that `refusal` accepts, its weights stored in
    `dtype` (default float32)."""
    import torch
    from timm.layers import GluMlp

    pe = model.patch_embed
    return dict(
        architectures=[ARCHITECTURE], model_type="dinov2_with_registers",
        hidden_size=model.embed_dim, num_hidden_layers=len(model.blocks),
        num_attention_heads=model.blocks[0].attn.num_heads, mlp_ratio=mlp_ratio(model),
        use_swiglu_ffn=type(model.blocks[0].mlp) is GluMlp, hidden_act="gelu", layer_norm_eps=model.norm.eps,
        qkv_bias=True, layerscale_value=1.0, image_size=pe.grid_size[0] * pe.patch_size[0],
        patch_size=pe.patch_size[0], num_channels=pe.proj.in_channels, num_register_tokens=int(model.num_reg_tokens),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0, initializer_range=0.02,
        apply_layernorm=True, reshape_hidden_states=True,
        torch_dtype=str(dtype or torch.float32).removeprefix("torch."),  # 5.x reads it as `dtype`
    )


def processor_config(data: dict) -> dict:
    """preprocessor_config.json from timm's data config (`timm.data.resolve_data_config`): the pixels timm's eval
    transform makes, as transformers' `BitImageProcessor` (the facebook/dinov2 checkpoints' processor) describes them.

    timm: resize to floor(size / crop_pct) (the short side; both sides for crop_mode "squash"), center crop `size`,
    the run's mean / std."""
    height, width = data["input_size"][-2:]
    mode, interpolation = data.get("crop_mode") or "center", data.get("interpolation") or "bicubic"
    if mode not in ("center", "squash") or interpolation not in PIL_RESAMPLE or height != width:
        raise UsageError(f"transformers' BitImageProcessor has no equivalent of timm's {mode} crop with "
                         f"{interpolation} resizing to {height} x {width}")
    scale = math.floor(height / (data.get("crop_pct") or 1.0))
    return dict(
        image_processor_type="BitImageProcessor", do_convert_rgb=True,
        do_resize=True, size=dict(height=scale, width=scale) if mode == "squash" else dict(shortest_edge=scale),
        resample=PIL_RESAMPLE[interpolation],
        do_center_crop=True, crop_size=dict(height=height, width=width),
        do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[float(v) for v in data["mean"]], image_std=[float(v) for v in data["std"]],
    )


def convert_state(sd: dict, depth: int) -> dict:
    """timm student state (class token with its folded position entry, `pos_embed` of the patches only) ->
    `Dinov2WithRegistersModel` state, with the names of the Hub's facebook/dinov2-with-registers checkpoints.

    Pure: tensors in, tensors out (each with its own storage, as safetensors wants). A classifier head is left out:
    `Dinov2WithRegistersModel` is the feature model."""
    import torch

    cls = sd["cls_token"]
    dim = cls.shape[-1]
    if math.isqrt(sd["pos_embed"].shape[1]) ** 2 != sd["pos_embed"].shape[1]:  # a square grid, no prefix entries
        raise ValueError("pos_embed has prefix entries: expected a phreg student (no_embed_class=True)")
    reg = sd.get("reg_token")
    out = {
        "embeddings.cls_token": cls,
        "embeddings.mask_token": torch.zeros(1, dim),  # only used with bool_masked_pos (DINOv2's pre-training)
        "embeddings.position_embeddings": torch.cat([torch.zeros(1, 1, dim), sd["pos_embed"]], 1),
        "embeddings.register_tokens": reg if reg is not None else torch.zeros(1, 0, dim),
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    for i in range(depth):
        t, h = f"blocks.{i}.", f"encoder.layer.{i}."
        swiglu = sd[f"{t}mlp.fc1.weight"].shape[0] == 2 * sd[f"{t}mlp.fc2.weight"].shape[1]
        fc1, fc2 = ("weights_in", "weights_out") if swiglu else ("fc1", "fc2")
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{t}attn.qkv.{kind}"].chunk(3, 0)  # timm's fused order
            out |= {f"{h}attention.attention.query.{kind}": q, f"{h}attention.attention.key.{kind}": k,
                    f"{h}attention.attention.value.{kind}": v,
                    f"{h}attention.output.dense.{kind}": sd[f"{t}attn.proj.{kind}"],
                    f"{h}norm1.{kind}": sd[f"{t}norm1.{kind}"], f"{h}norm2.{kind}": sd[f"{t}norm2.{kind}"],
                    f"{h}mlp.{fc1}.{kind}": sd[f"{t}mlp.fc1.{kind}"], f"{h}mlp.{fc2}.{kind}": sd[f"{t}mlp.fc2.{kind}"]}
        out[f"{h}layer_scale1.lambda1"] = sd[f"{t}ls1.gamma"]
        out[f"{h}layer_scale2.lambda1"] = sd[f"{t}ls2.gamma"]
    return {k: v.detach().float().cpu().clone().contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ writing

def max_difference(timm_model, hf_model, x) -> float:
    """max |last_hidden_state - forward_features| on the same pixels `x` (B, 3, H, W); inf if the shapes differ."""
    import torch

    with torch.no_grad():
        a = timm_model.forward_features(x)
        b = hf_model(pixel_values=x).last_hidden_state
    return (a - b).abs().max().item() if a.shape == b.shape else math.inf


def write_transformers(student, folder: str | Path, metadata: dict[str, str] | None = None, dtype=None) -> dict:
    """Write the transformers files for a timm student into `folder`, its floating tensors in `dtype` (default
    float32), load them back with `AutoModel`, and compare with the student on a seeded N(0, 1) batch at its size.
    Returns what was measured (`max_diff`, `registers`, `img_size`); a difference over `TOLERANCE` stops with one line
    (exit 1). `metadata` (str -> str) goes into the safetensors header, as in the timm export. Atomicity is the
    caller's (`export_transformers`, staging).

    The tolerance is float32's for every dtype: both models compute in float32 from the same stored values (the
    transformers folder loaded as float32; the timm student with its weights rounded to `dtype`, which a student loaded
    from a timm export of that dtype already is), so any difference is the conversion's, never the rounding's."""
    import torch
    from timm.data import resolve_data_config

    from ..files.tensorfile import save_file
    from .export import check_range, dtype_name

    transformers = require_transformers()
    if not student.no_embed_class:  # phreg's students never are: their class entry is folded into cls_token
        raise UsageError("the transformers export takes a phreg student (no_embed_class=True, the class token's "
                         "position entry folded into it)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = student.patch_embed.img_size[0]
    data = dict(resolve_data_config({}, model=student), input_size=(3, size, size))
    dtype = dtype or torch.float32
    tensors = convert_state(student.state_dict(), len(student.blocks))
    check_range(tensors, dtype)
    save_file(tensors, folder / WEIGHTS, {"format": "pt", **(metadata or {}), "dtype": dtype_name(dtype)},
              dtypes={k: dtype for k in tensors})  # metadata sorted: reproducible
    del tensors
    (folder / CONFIG).write_text(json.dumps(hf_config(student, dtype), indent=2) + "\n")
    (folder / PROCESSOR).write_text(json.dumps(processor_config(data), indent=2) + "\n")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a local folder: its "Loading weights" bar says nothing
    try:  # float32 whatever the file holds (5.x would otherwise keep the file's dtype)
        loaded = transformers.AutoModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if type(loaded).__name__ != ARCHITECTURE:
        raise Aborted(f"transformers {transformers.__version__} loads the export as {type(loaded).__name__}, "
                      f"not {ARCHITECTURE}")
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    stored = student if dtype == torch.float32 else copy.deepcopy(student).to(dtype).float()
    diff = max_difference(stored.eval(), loaded, x)
    if not diff <= TOLERANCE:  # a transformers that computes differently: refuse rather than ship it
        raise Aborted(f"transformers {transformers.__version__}'s {ARCHITECTURE} differs from the timm student by "
                      f"{diff:.3g} (> {TOLERANCE:g}) at {size} px; nothing written")
    return dict(max_diff=diff, registers=int(student.num_reg_tokens), img_size=size,
                transformers=transformers.__version__, dtype=dtype_name(dtype))


def export_transformers(student, out: str | Path, metadata: dict[str, str] | None = None,
                        name: str | None = None, run: str | Path = "RUN", dtype=None) -> dict:
    """The transformers folder `out` (`FILES`) for a timm student, written whole or not at all, its weights in `dtype`
    (default float32)."""
    out = Path(out)
    check_replaceable(out)
    require_transformers()
    check_exportable(student, name or student.pretrained_cfg.get("architecture", "the model"), run)
    with writing("the transformers export", out), atomic_dir(out) as tmp:
        return write_transformers(student, tmp, metadata, dtype)


def _from_timm_export(export: Path):
    """A timm export folder -> (the student, its safetensors metadata, the dtype its weights are stored in)."""
    import timm

    from ..run.folder import WEIGHTS as TIMM_WEIGHTS
    from .export import read_metadata, stored_dtype

    student = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    metadata = {k: v for k, v in read_metadata(export / TIMM_WEIGHTS).items() if k != "format"}
    return student, metadata, stored_dtype(metadata)


def stage_transformers(export: str | Path, folder: str | Path, run: str | Path = "RUN") -> dict:
    """`phreg push --format transformers|both`: a run's finished timm export, converted into `folder` (the upload's
    staging folder or its `transformers/`): the transformers weights are the published timm weights, in their dtype."""
    import timm

    require_transformers()
    export = Path(export)
    meta = timm.create_model(f"local-dir:{export}", pretrained=False, device="meta")
    check_exportable(meta, meta.pretrained_cfg.get("architecture", str(export)), run)
    student, metadata, dtype = _from_timm_export(export)
    return write_transformers(student, folder, metadata, dtype)


def export_run_transformers(run: str | Path, out: str | Path | None = None, timm_out: str | Path | None = None,
                            dtype: str | None = None) -> tuple[Path, dict]:
    """`phreg export RUN --format transformers [--dtype D]`: the newest checkpoint -> `out` (default
    RUN/export-transformers), its weights in the dtype of the timm export (`dtype`, default the recipe's export.dtype).

    Through the timm export of that checkpoint, written by `hub.export.export_run` to `timm_out` (`--format both`)
    or else to a temporary folder beside `out`, removed after: the transformers folder is the conversion of exactly
    what `phreg export RUN` writes. Everything that can be checked without the weights is checked before anything is
    written."""
    from ..config.recipe import load_recipe
    from ..models.loading import build_model
    from .export import export_run

    run = require_run(run)
    out = Path(out) if out is not None else run / f"export{SUFFIX}"
    check_replaceable(out)
    require_transformers()
    name = load_recipe(run / RECIPE).model.name
    check_exportable(build_model(name, pretrained=False, device="meta"), name, run)  # the teacher's layout is the student's
    if timm_out is not None:
        student, metadata, stored = _from_timm_export(export_run(run, timm_out, dtype))
        return out, export_transformers(student, out, metadata, name, run, stored)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".timm", dir=out.parent))
    try:
        student, metadata, stored = _from_timm_export(export_run(run, scratch / "export", dtype))
        return out, export_transformers(student, out, metadata, name, run, stored)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_replaceable(out: Path) -> None:
    """Only a new folder or an earlier transformers export is replaced."""
    if not replaceable(out, set(FILES)):
        raise UsageError(f"refusing to replace {out}: it exists and is not a transformers export; choose a new folder")
