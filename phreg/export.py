"""Export: `model.safetensors` + `config.json` in timm's Hugging Face layout.

`timm.create_model('local-dir:RUN/export', pretrained=True)` rebuilds the student, registers included, without phreg.
The folder is written whole or not at all (see `files.atomic_dir`).
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
from timm.models._hub import save_config_for_hf
from timm.models.vision_transformer import VisionTransformer

from .files import atomic_dir

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def export_student(student: VisionTransformer, out: str | Path, mean, std, metadata: dict[str, str]) -> Path:
    """Write the export folder atomically; `metadata` (str -> str) goes into the safetensors header."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in student.state_dict().items()}
        safetensors.torch.save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt", **metadata})
        save_config_for_hf(student, tmp / CONFIG,
                           model_config=dict(pretrained_cfg=dict(mean=tuple(mean), std=tuple(std))))
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    with safetensors.safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})
