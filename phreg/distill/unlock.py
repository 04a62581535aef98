"""The unlocked subset: which student tensors train, at which learning rate.

Everything else stays frozen and is *the teacher's own storage* (see `phreg.backbones`), so an unlocked tensor is
first given storage of its own: training it must never move the teacher.
"""

from __future__ import annotations

import fnmatch
import re

import torch

from ..errors import UsageError
from ..recipe import UnlockGroup


def resolve_patterns(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """`blocks.-1.*` -> `blocks.11.*`: negative block indices count from the end."""
    depth = len(model.blocks)
    return [re.sub(r"blocks\.(-\d+)", lambda m: f"blocks.{depth + int(m.group(1))}", p) for p in patterns]


def unlock(model: torch.nn.Module, groups: list[UnlockGroup], lr: float, weight_decay: float) -> list[dict]:
    """Freeze everything, unlock the parameters the groups name; return optimizer param groups."""
    model.requires_grad_(False)
    named = dict(model.named_parameters())
    taken: dict[str, int] = {}
    param_groups = []
    for gi, group in enumerate(groups):
        names = []
        for pattern in resolve_patterns(model, group.params):
            hits = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise UsageError(f"recipe key train.unlock[{gi}].params: {pattern!r} matches no parameter "
                                 f"(e.g. {', '.join(list(named)[:4])}, ...)")
            for n in hits:
                if n in taken and taken[n] != gi:
                    raise UsageError(f"recipe key train.unlock: {n} is matched by groups {taken[n]} and {gi}")
                taken[n] = gi
                if n not in names:
                    names.append(n)
        for n in names:
            p = named[n]
            p.data = p.data.clone()  # own storage: the frozen rest is shared with the teacher
            p.requires_grad_(True)
        wd = weight_decay if group.weight_decay is None else group.weight_decay
        param_groups.append(dict(params=[named[n] for n in names], names=names, lr=lr * group.lr_scale,
                                 weight_decay=wd))
    return [g for g in param_groups if g["params"]]


def unlocked_table(model: torch.nn.Module, param_groups: list[dict]) -> str:
    total = sum(p.numel() for p in model.parameters())
    rows = [f"{'unlocked parameter':<40} {'shape':>18} {'count':>10} {'lr':>9}"]
    n_unlocked = 0
    for g in param_groups:
        for name, p in zip(g["names"], g["params"]):
            rows.append(f"{name:<40} {str(tuple(p.shape)):>18} {p.numel():>10,} {g['lr']:>9.2e}")
            n_unlocked += p.numel()
    rows.append(f"{'total unlocked':<40} {'':>18} {n_unlocked:>10,} of {total:,} ({100 * n_unlocked / total:.1f}%)")
    return "\n".join(rows)
