"""The test-time-register sidecar: the small JSON that, with the base model's weights, makes a test-time-register model
reproducible. Written by `phreg.ttr.save_test_time_registers`, read here for every `--ttr SIDECAR` and
`model.teacher_ttr`. Torch-free, so a command checks a sidecar before torch loads."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from ..files.atomic import write_json

SCHEMA = "phreg.ttr/1"
SIDECAR = "test_time_registers.json"
REGISTER_VALUE = "per neuron, the signed extreme (largest |activation|) over the image's tokens, before the edit"
PATCH_VALUE = 0.0


def sidecar_path(path: str | Path) -> Path:
    """A sidecar file, or the sidecar in a folder."""
    path = Path(path).expanduser()
    return path / SIDECAR if path.is_dir() or path.suffix != ".json" else path


def check_ttr(how: str | None, what: str = "--ttr") -> None:
    """Test-time registers named sensibly: none, find, or a sidecar file (or a folder holding one)."""
    if how is None or how in ("none", "find"):
        return
    path = Path(how).expanduser()
    if not (path.is_file() or (path / SIDECAR).is_file()):
        raise UsageError(f"{what}: {how} is neither none, find nor a test-time-register sidecar "
                         f"(a .json file or a folder holding {SIDECAR})")


def read_sidecar(path: str | Path) -> dict:
    """The sidecar's record (validated): {schema, base, neurons: {"block": [units]}, found, ...}."""
    path = Path(path).expanduser()
    path = path / SIDECAR if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"{path}: no test-time-register sidecar there")
    try:
        record = json.loads(path.read_text())
        assert isinstance(record, dict) and record.get("schema") == SCHEMA, \
            f"schema {record.get('schema') if isinstance(record, dict) else None!r}, expected {SCHEMA}"
        record["neurons"] = {int(b): [int(u) for u in units] for b, units in record["neurons"].items()}
    except (ValueError, AssertionError, KeyError, AttributeError, TypeError) as e:
        raise UsageError(f"{path} is not a test-time-register sidecar: {e}") from None
    return record


def base_identity(cfg) -> dict:
    """The base model as a sidecar names it: timm name / spec, input size, normalization, where its weights are from
    (file name + sha256, or Hub id + revision: `phreg.models.Weights.record`)."""
    from ..models.weights import find_weights

    return dict(name=cfg.name, img_size=cfg.img_size, mean=cfg.mean, std=cfg.std,
                weights=find_weights(cfg).record(cfg.name))


def sidecar_record(base, neurons: dict[int, list[int]], register: int, found: dict | None) -> dict:
    """The sidecar's JSON: base identity (a `ModelCfg` or an identity dict), neurons by block, how they are moved."""
    return dict(
        schema=SCHEMA,
        method="test-time registers (Jiang et al., 2025, 'Vision Transformers Don't Need Trained Registers')",
        note="stock timm alone does not apply this: load it with phreg.ttr.load_test_time_registers",
        base=base_identity(base) if not isinstance(base, dict) else base,
        registers=1, register_init="zeros, no positional embedding", register_token=register,
        read_at="input of blocks[i].mlp.fc2 (the MLP hidden activation)",
        neurons={str(b): u for b, u in neurons.items()},
        register_value=REGISTER_VALUE, patch_value=PATCH_VALUE, class_and_old_registers="unchanged", found=found)


def write_sidecar(path: str | Path, record: dict) -> Path:
    """Write the sidecar atomically to `path`, a .json file or a folder (then `test_time_registers.json` in it)."""
    path = Path(path)
    path = path / SIDECAR if path.suffix != ".json" else path
    write_json(path, record)
    return path
