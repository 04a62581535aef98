"""Which images train and which are held out: `data.val_split` of a folder, drawn by seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UsageError


def check_val_split(fraction: float, n: int) -> int:
    """How many of `n` images `data.val_split` holds out: round(fraction * n), at least one when fraction > 0, and
    never all of them. Checked here on the folder's scan, and by `data.split_files` on every list it splits."""
    if fraction <= 0:
        return 0
    held = max(1, round(fraction * n))
    if held >= n:
        raise UsageError(f"data.val_split={fraction} leaves no training image out of {n}")
    return held


def split_files(files: list[Path], fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Hold out round(fraction * n) files (at least one when fraction > 0), chosen by seed: (train, held out)."""
    n_val = check_val_split(fraction, len(files))
    if not n_val:
        return files, []
    held = set(np.random.default_rng([seed, 2**32 - 1]).permutation(len(files))[:n_val].tolist())
    return [f for i, f in enumerate(files) if i not in held], [f for i, f in enumerate(files) if i in held]
