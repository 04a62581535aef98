"""timm student vs its transformers export: max |last_hidden_state - forward_features| per model and resolution.

    python benchmarks/transformers_parity.py --dinov2 ../shared/assets/weights/dinov2_vits14.safetensors

Each model is given 16 registers (4 for ViT-g), exported for timm (`export_student`), loaded back with
`timm.create_model('local-dir:...')`, and converted with `export_transformers`; both then see the same pixels:
the four photos embedded in phreg through the export's own image processor, and a seeded N(0, 1) batch of 2 at each
size. Other sizes go through timm's `dynamic_img_size=True` (and, for one, `img_size=N` at load time) and through
transformers' own position-embedding resampling. `|tokens|` is the largest token value, for scale.

Real DINOv2-S at full depth is the answer that matters; L and g (SwiGLU) and a `reg4` teacher are depth-2 random
models with every weight at a scale where it shows (as in tests/test_transformers.py), since only DINOv2-S's weights
are here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from phreg.backbones import add_registers  # noqa: E402
from phreg.data.scan import embedded_photos  # noqa: E402
from phreg.hub.export import export_student  # noqa: E402
from phreg.hub.transformers import export_transformers, max_difference  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def randomized(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 1.0))
    return model.eval()


def rows(label: str, teacher, registers: int, sizes, folder: Path):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    export_student(add_registers(teacher, registers), folder / "timm", MEAN, STD, {})
    student = timm.create_model(f"local-dir:{folder / 'timm'}", pretrained=True).eval()
    export_transformers(student, folder / "hf")
    hf = AutoModel.from_pretrained(str(folder / "hf")).eval()
    own = student.patch_embed.img_size[0]
    photos = [Image.open(p).convert("RGB") for p in sorted(embedded_photos().glob("*.[pj][np]g"))]
    x = AutoImageProcessor.from_pretrained(str(folder / "hf"))(images=photos, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        scale = student.forward_features(x).abs().max().item()
    yield label, f"{own} (export), 4 photos", max_difference(student, hf, x), scale
    dynamic = timm.create_model(f"local-dir:{folder / 'timm'}", pretrained=True, dynamic_img_size=True).eval()
    for h, w in sizes:
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))
        model, how = (student, "") if (h, w) == (own, own) else (dynamic, ", timm dynamic_img_size")
        with torch.no_grad():
            scale = model.forward_features(x).abs().max().item()
        yield label, f"{h}x{w}{' (export)' if how == '' else ''}, N(0,1){how}", max_difference(model, hf, x), scale
        if h == w and h != own and h == sizes[-1][0]:
            fixed = timm.create_model(f"local-dir:{folder / 'timm'}", pretrained=True, img_size=h).eval()
            yield label, f"{h}x{w}, N(0,1), timm img_size={h} at load", max_difference(fixed, hf, x), scale
        if h == w and h < own:  # for contrast: the resampler of transformers' Dinov2Model (no antialias)
            from timm.layers import resample_abs_pos_embed

            fixed = timm.create_model(f"local-dir:{folder / 'timm'}", pretrained=True, img_size=h).eval()
            grid = h // student.patch_embed.patch_size[0]
            with torch.no_grad():
                fixed.pos_embed.copy_(resample_abs_pos_embed(student.pos_embed, [grid, grid], num_prefix_tokens=0,
                                                             antialias=False))
            yield label, f"{h}x{w}, N(0,1), timm resampled *without* antialias (contrast)", \
                max_difference(fixed, hf, x), scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dinov2", type=Path, help="DINOv2-S/14 weights (timm safetensors)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    import transformers

    print(f"torch {torch.__version__}, timm {timm.__version__}, transformers {transformers.__version__}, float32 CPU")
    print("| model | input | max abs diff | max abs token |\n| --- | --- | ---: | ---: |")
    cases = []
    if args.dinov2:
        from phreg.models.loading import load_teacher
        from phreg.config.recipe import ModelCfg

        s = load_teacher(ModelCfg(name="vit_small_patch14_dinov2", checkpoint=str(args.dinov2), img_size=224))
        cases.append(("DINOv2-S/14 real, +16 reg", s, 16, [(224, 224), (112, 112), (224, 336), (518, 518)]))
    for name, size, regs, label in [("vit_large_patch14_dinov2", 224, 16, "DINOv2-L/14 random depth 2, +16 reg"),
                                    ("vit_giant_patch14_dinov2", 224, 4, "DINOv2-g/14 (SwiGLU) random depth 2, +4 reg"),
                                    ("vit_small_patch14_reg4_dinov2", 224, 16,
                                     "DINOv2-S/14-reg4 random depth 2, 4 + 16 reg")]:
        teacher = randomized(timm.create_model(name, pretrained=False, depth=2, img_size=size))
        cases.append((label, teacher, regs, [(size, size), (518, 518)]))
    for label, teacher, regs, sizes in cases:
        with tempfile.TemporaryDirectory(prefix="phreg-parity-") as tmp:
            for model, where, diff, scale in rows(label, teacher, regs, sizes, Path(tmp)):
                print(f"| {model} | {where} | {diff:.2e} | {scale:.3g} |", flush=True)


if __name__ == "__main__":
    main()
