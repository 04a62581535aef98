"""Test-time registers wherever a model is used: `--ttr SIDECAR|find` of inspect, eval and segment, the recipe key
`model.teacher_ttr`, and `phreg.dense_features(..., ttr=...)` all resolve here.

`how` is "find" (the register neurons are found on a few of the images at hand, `find_register_neurons`) or the path
of a sidecar written by `save_test_time_registers` (a .json file, or a folder holding `test_time_registers.json`);
"none" (or None) means no test-time registers. The neurons are applied to the model as it is loaded, which may be a
PH-Reg student of the model they were found in: its early blocks are the teacher's, so the same units write there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import UsageError
from .model import add_test_time_registers
from .neurons import RegisterNeurons, find_register_neurons
from .sidecar import read_sidecar

FIND_IMAGES = 16  # images the finder reads when `how` is "find": enough for a stable ranking (tests: 16 CamVid frames)


def neurons_for(how: str | Path, model: torch.nn.Module,
                images: torch.Tensor | Callable[[], torch.Tensor] | None = None
                ) -> RegisterNeurons | dict[int, list[int]] | None:
    """The register neurons `how` names for `model`: found on `images` (a tensor, or a function giving one, called
    only for "find"), read from a sidecar, or None for "none"."""
    if how is None or str(how) == "none":
        return None
    if str(how) == "find":
        if images is None:
            raise UsageError("--ttr find needs images to find the register neurons on")
        x = images() if callable(images) else images
        return find_register_neurons(model, x[:FIND_IMAGES])
    return read_sidecar(how)["neurons"]


def with_test_time_registers(loaded, how: str | Path | None, images=None, neurons=None):
    """A `phreg.models.Loaded` with test-time registers (same name + " +TTR"), and the neurons applied. The loaded
    model itself when `how` is "none", or when there are no neurons (a clean model: nothing to move, and an idle
    extra token would only perturb it). Pass `neurons` to apply ones already found (e.g. the teacher's, to its
    student)."""
    if neurons is None:
        neurons = neurons_for(how, loaded.model, images)
    if neurons is None or not count(neurons):
        return loaded, neurons
    model = add_test_time_registers(loaded.model, neurons)
    return replace(loaded, model=model, name=f"{loaded.name} +TTR"), neurons


def count(neurons: RegisterNeurons | Mapping[int, Sequence[int]]) -> int:
    """How many register neurons."""
    return len(neurons.neurons) if isinstance(neurons, RegisterNeurons) else sum(len(u) for u in neurons.values())


def neurons_record(neurons: RegisterNeurons | Mapping[int, Sequence[int]] | None, how) -> dict | None:
    """What eval.json and summary.json keep of the neurons: where they came from, by block, and the finder's
    evidence when they were found."""
    if neurons is None:
        return None
    found = neurons if isinstance(neurons, RegisterNeurons) else None
    by_layer = found.by_layer() if found is not None else {int(b): list(u) for b, u in neurons.items()}
    return dict(source="found" if str(how) == "find" else str(how), neurons={str(b): u for b, u in by_layer.items()},
                count=sum(len(u) for u in by_layer.values()), found=found.to_dict() if found is not None else None)
