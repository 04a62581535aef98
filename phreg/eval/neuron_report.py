"""`phreg inspect MODEL --neurons`: a model's register neurons (Jiang et al., 2025), with a picture of where they fire.

The finder is `phreg.ttr.find_register_neurons` (any family through the backbone seam); this module reads the images,
prints its table, and draws per image the neurons' activation over the patch grid next to the patch-norm map of the
block that decides outliers. A model without artifacts (real DINOv2-S) gets "no register neurons", not a guess.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..files.atomic import write_json
from ..models.specs import Loaded
from ..ttr.neurons import RegisterNeurons, find_register_neurons
from .analysis import to_rgb
from .figures import neuron_panels, picture_names
from .inspection import load_images, shown_name

SCHEMA = "phreg.neurons/1"


@torch.no_grad()
def neuron_maps(model: torch.nn.Module, images: torch.Tensor, found: RegisterNeurons) -> tuple[list, torch.Tensor]:
    """Per image, the kept neurons' summed |activation| over the patch grid (None without neurons), and the patch
    norms (B, gh, gw) at the output of the block that decides outliers (pre-norm)."""
    from ..backbones import backbone

    family = backbone(model)
    prefix, grid, layer = family.num_prefix, family.grid, found.outliers["layer"]
    acts: dict[int, torch.Tensor] = {}
    hooks = [model.blocks[b].mlp.fc2.register_forward_pre_hook(
        lambda m, args, b=b, u=torch.tensor(units): acts.__setitem__(b, args[0][:, prefix:, u].abs().sum(-1)))
        for b, units in found.by_layer().items()]
    try:
        _, blocks = family.block_outputs(images, len(model.blocks))
    finally:
        for h in hooks:
            h.remove()
    norms = blocks[layer][:, prefix:].float().norm(dim=-1).view(len(images), *grid)
    act = sum(acts.values()).view(len(images), *grid).float() if acts else None
    return [a for a in act] if act is not None else [None] * len(images), norms


def inspect_neurons(loaded: Loaded, images_dir, out: Path | None, limit: int = 0, pictures: int = 8,
                    device="cpu", base=None, **finder) -> dict:
    """Find the register neurons on the images under `images_dir`; with `out`, write neurons.json and one picture
    per image (at most `pictures`), and, when neurons were found and `base` (the `ModelCfg` the model was loaded
    with) is given, the sidecar `test_time_registers.json` that `--ttr OUT` and `load_test_time_registers` read.
    `finder`: keyword arguments of `find_register_neurons` (ratio, tails, top_k)."""
    start = time.perf_counter()
    files, images = load_images(images_dir, loaded, limit)
    model = loaded.model.to(device)
    found = find_register_neurons(model, images.to(device), **finder)
    record = dict(schema=SCHEMA, model=loaded.name, img_size=loaded.img_size, files=[str(f) for f in files],
                  **found.to_dict(), table=found.table())
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        shown = images[:pictures].to(device)
        acts, norms = neuron_maps(model, shown, found)
        what = ", ".join(f"{b}:{u}" for b, us in found.by_layer().items() for u in us) or "none"
        names = picture_names(files[:len(shown)], "neurons_")
        record["figures"] = [neuron_panels(
            [(to_rgb(shown[i].cpu(), loaded.mean, loaded.std), None if acts[i] is None else acts[i].cpu().numpy(),
              norms[i].cpu().numpy())], out / names[i], what, found.outliers["layer"],
            shown_name(files[i], images_dir)).name for i in range(len(shown))]
        if found and base is not None:
            from ..ttr.model import add_test_time_registers, save_test_time_registers

            record["sidecar"] = save_test_time_registers(add_test_time_registers(model, found), out, base).name
    record["seconds"] = round(time.perf_counter() - start, 1)
    if out is not None:
        write_json(out / "neurons.json", record)
    return record
