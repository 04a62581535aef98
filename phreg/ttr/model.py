"""Test-time registers (Jiang et al., 2025): the training-free fix, as a model phreg reads like any other.

The model is the teacher with one extra register token, zero-initialised and without a positional embedding
(`phreg.backbones.add_registers(teacher, 1, init="zeros", noise=0)`: a stock timm model of the teacher's class whose
tensors *are* the teacher's), plus a forward pre-hook on `blocks[i].mlp.fc2` of every block that holds register
neurons. The hook edits the MLP's hidden activation (fc2's input) of those units only, per image:

* the register token gets, per neuron, its signed extreme over the image's tokens (the activation of largest
  magnitude, read before the edit): the value it has where it writes the artifact;
* every patch token gets 0, so nothing writes the outlier vector into the image any more;
* the class token and any registers the model already had keep theirs.

So the register carries what the outliers carried, and the patches keep their content. As in the authors' code
(`activate_on_registers`, normal_values="zero"), except that each neuron takes its own extreme (theirs: one value,
the extreme over all of a layer's register neurons, of the batch's first image).

The hooks live on this model instance: `forward_features`, `forward_intermediates`, `phreg.dense_features` with any
head and everything built on them see the fix; **stock timm alone does not apply it** - a timm model created from the
base weights has no such hooks and no extra token. Save and share it as the reference to the base weights plus a
small sidecar JSON (`save_test_time_registers`), and load it back with `load_test_time_registers`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backbones import add_registers
from ..errors import UsageError
from .neurons import RegisterNeurons
from .sidecar import PATCH_VALUE, SIDECAR, read_sidecar, sidecar_record, write_sidecar



class MoveToRegister:
    """fc2 forward pre-hook: the listed hidden units' activations leave the patches for the register token."""

    def __init__(self, units: Sequence[int], register: int, first_patch: int):
        self.units = torch.as_tensor(list(units), dtype=torch.long)
        self.register, self.first_patch = register, first_patch

    def __call__(self, module, args):
        h = args[0]  # (B, N, hidden): timm's Mlp / GluMlp / SwiGLU hidden activation, tokens in timm's order
        if self.units.device != h.device:
            self.units = self.units.to(h.device)
        moved = h.index_select(-1, self.units)  # (B, N, k)
        hi, lo = moved.amax(1), moved.amin(1)
        edited = torch.full_like(moved, PATCH_VALUE)  # patches: 0
        edited[:, :self.first_patch] = moved[:, :self.first_patch]  # class token, older registers: unchanged
        edited[:, self.register] = torch.where(hi.abs() >= lo.abs(), hi, lo)  # ours: the signed extreme
        if torch.is_grad_enabled() and h.requires_grad:
            return (h.index_copy(-1, self.units, edited),) + args[1:]  # out of place: autograd may need h
        h.index_copy_(-1, self.units, edited)  # k columns written in place: no copy of the whole activation
        return None


@dataclass
class TestTimeRegisters:
    """What a test-time-register model applies (kept on it as `model.test_time_registers`)."""
    neurons: dict[int, list[int]]  # block -> hidden-unit indices of its MLP
    register: int  # index of the test-time register among the tokens (the last prefix token)
    found: RegisterNeurons | None = None  # the finder's evidence, when the neurons came from it
    base: dict | None = None  # the base model's identity, once saved or loaded
    handles: list = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Take the hooks off (the extra token stays: the model then computes the teacher plus a zero token)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def add_test_time_registers(teacher: torch.nn.Module,
                            neurons: RegisterNeurons | Mapping[int, Sequence[int]]) -> torch.nn.Module:
    """The teacher with one zero-initialised register token onto which `neurons` move their activations.

    `neurons`: what `find_register_neurons` returned, or {block: [unit, ...]}. The teacher is left as it was (the new
    model shares its tensors, not its modules or hooks). With no neurons the result is the teacher plus an idle zero
    token. Stock timm alone does not apply the fix: the hooks live on the returned instance only.
    """
    found = neurons if isinstance(neurons, RegisterNeurons) else None
    by_layer = {int(b): [int(u) for u in units] for b, units in
                (neurons.by_layer() if found is not None else neurons).items() if len(units)}
    depth = len(teacher.blocks)
    for b, units in by_layer.items():
        width = teacher.blocks[b % depth].mlp.fc2.in_features if -depth <= b < depth else 0
        if not width or min(units) < 0 or max(units) >= width:
            raise UsageError(f"register neurons {{{b}: {units}}} do not exist in this model "
                             f"({depth} blocks of {teacher.blocks[0].mlp.fc2.in_features} MLP units)")
    model = add_registers(teacher, 1, init="zeros", noise=0)
    if not any(p.requires_grad for p in teacher.parameters()):
        model.requires_grad_(False)  # a frozen teacher gives a frozen model
    register = int(model.num_prefix_tokens) - 1  # timm orders [class, registers..., patches]; ours is appended last
    ttr = TestTimeRegisters({b % depth: u for b, u in sorted(by_layer.items())}, register, found)
    for b, units in ttr.neurons.items():
        hook = MoveToRegister(units, register, int(model.num_prefix_tokens))
        ttr.handles.append(model.blocks[b].mlp.fc2.register_forward_pre_hook(hook))
    model.test_time_registers = ttr
    return model


def save_test_time_registers(model: torch.nn.Module, path: str | Path, base) -> Path:
    """Write the sidecar (atomically) to `path`, a .json file or a folder (then `test_time_registers.json` in it).

    `base`: the `phreg.config.recipe.ModelCfg` the teacher was loaded with (or an identity dict from `base_identity`). The
    weights themselves are not copied: publish the sidecar next to the base weights file, or name the base model.
    """
    ttr = _ttr(model)
    record = sidecar_record(base, ttr.neurons, ttr.register, ttr.found.to_dict() if ttr.found is not None else None)
    path = write_sidecar(path, record)
    ttr.base = record["base"]
    return path


def load_test_time_registers(path: str | Path, checkpoint: str | Path | None = None) -> torch.nn.Module:
    """The test-time-register model a sidecar describes, on its base weights.

    The base weights are, in order: `checkpoint`, the recorded file name beside the sidecar, else phreg's usual
    lookup of the recorded model name (checkpoints folder, Hub cache). A recorded sha256 must match.
    """
    from ..config.recipe import ModelCfg
    from ..files.atomic import sha256_file
    from ..models.loading import load_teacher
    from ..models.weights import find_weights

    path = Path(path).expanduser()
    path = path / SIDECAR if path.is_dir() else path
    record = read_sidecar(path)
    if not isinstance(record.get("base"), dict):
        raise UsageError(f"{path} names no base model (a sidecar written by save_test_time_registers does)")
    base, neurons = record["base"], record["neurons"]
    weights = base.get("weights") or {}
    if checkpoint is None and weights.get("source") == "file" and (path.parent / weights["file"]).is_file():
        checkpoint = path.parent / weights["file"]
    cfg = ModelCfg(name=base["name"], checkpoint=str(checkpoint) if checkpoint else None, img_size=base["img_size"],
                   mean=base.get("mean"), std=base.get("std"))
    source = find_weights(cfg)
    if source.kind == "file" and source.file.is_file() and weights.get("sha256") \
            and sha256_file(source.file) != weights["sha256"]:
        raise UsageError(f"{source.file} is not the base these register neurons were found in "
                         f"(its sha256 is not the recorded {weights['sha256'][:16]}...)")
    model = add_test_time_registers(load_teacher(cfg), neurons)
    ttr = _ttr(model)
    ttr.base = base
    if record.get("found"):
        ttr.found = RegisterNeurons.from_dict(record["found"])
    return model


def _ttr(model) -> TestTimeRegisters:
    ttr = getattr(model, "test_time_registers", None)
    if not isinstance(ttr, TestTimeRegisters):
        raise UsageError("the model has no test-time registers (build it with phreg.ttr.add_test_time_registers)")
    return ttr
