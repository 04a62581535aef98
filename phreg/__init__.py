"""phreg: give a pretrained Vision Transformer register tokens after the fact (PH-Reg self-distillation).

The public API: `phreg.dense_features` below; everything else is used through the `phreg` command
(`phreg/commands/`) or the packages' own modules. `import phreg` stays cheap: torch is imported on first use.
"""

__version__ = "0.1.0"
__all__ = ["dense_features"]


def dense_features(model, images, head: str = "final", sigma: float = 5.0, ttr=None):
    """Dense features (B, gh, gw, D) of any model phreg supports, plain or distilled, through a dense head.

    `images` are normalized (B, 3, H, W) at the model's input size. `head`: final | last_block | naclip | maskclip
    (see `phreg/backbones/heads.py`); `sigma` is NACLIP's neighbourhood width in patches. `ttr`: read the model with
    test-time registers (`phreg.ttr`): a sidecar path, "find" (the neurons found on `images`), or the neurons
    themselves ({block: [unit, ...]} or what `find_register_neurons` returned). A model built with
    `add_test_time_registers` / `load_test_time_registers` needs none: it carries them.
    """
    from pathlib import Path

    from .backbones import dense_features as features

    if ttr is not None and str(ttr) != "none":
        from .ttr.model import add_test_time_registers
        from .ttr.use import neurons_for

        neurons = neurons_for(ttr, model, images) if isinstance(ttr, (str, Path)) else ttr
        model = add_test_time_registers(model, neurons)  # shares the model's tensors: no copy
    return features(model, images, head, sigma)
