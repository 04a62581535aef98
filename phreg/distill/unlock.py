"""The unlocked subset: which student tensors train, at which learning rate.

A recipe names what to unlock per group, either semantically (`registers`, `class_token`, `pos_embed`, `patch_embed`,
`last_block`, `last_blocks:N`, `norm`: the family in `phreg.backbones` says which parameters that is, so one recipe
works for every family) or as timm parameter-name patterns (`blocks.-1.*`, `patch_embed.proj.weight`; negative block
indices count from the end). A semantic part the model lacks (SigLIP's class token, DINOv3's positional embedding) is
skipped with a note; a raw pattern that matches nothing is an error.

Everything else stays frozen and is *the teacher's own storage* (see `phreg.backbones`), so an unlocked tensor is
first given storage of its own: training it must never move the teacher. That storage is dense and row-major
(`own_storage`): the student's `pos_embed` is a slice of the teacher's (the class entry folded off), and a clone that
kept its strides made DDP warn "Grad strides do not match bucket view strides" and copy the gradient every step.
"""

from __future__ import annotations

import fnmatch

import torch

from ..backbones import SEMANTIC, backbone
from ..config.recipe import UnlockGroup
from ..errors import UsageError


def own_storage(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of `t` (in `dtype`) in storage of its own, exactly its size, with row-major strides (also on size-1
    dimensions, which `clone()` and `is_contiguous()` let keep a view's strides, and which DDP's gradient buckets
    compare)."""
    out = torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)
    out.copy_(t)
    return out


def unlock(model: torch.nn.Module, groups: list[UnlockGroup], lr: float, weight_decay: float,
           notes: list[str] | None = None) -> list[dict]:
    """Freeze everything, unlock the parameters the groups name; return optimizer param groups. Semantic parts the
    model lacks are appended to `notes`."""
    model.requires_grad_(False)
    family = backbone(model)
    named = dict(model.named_parameters())
    taken: dict[str, int] = {}
    param_groups = []
    notes = [] if notes is None else notes
    for gi, group in enumerate(groups):
        names = []
        for pattern in group.params:
            semantic = family.part_patterns(pattern) is not None
            for resolved in family.resolve([pattern], notes):
                hits = [n for n in named if fnmatch.fnmatchcase(n, resolved)]
                if not hits and semantic:
                    notes.append(f"{pattern}: skipped, no parameter matches {resolved}")
                    continue
                if not hits:
                    raise UsageError(f"recipe key train.unlock[{gi}].params: {pattern!r} matches no parameter "
                                     f"(semantic names: {', '.join(SEMANTIC)}; or timm names, e.g. "
                                     f"{', '.join(list(named)[:4])}, ...)")
                for n in hits:
                    if n in taken and taken[n] != gi:
                        raise UsageError(f"recipe key train.unlock: {n} is matched by groups {taken[n]} and {gi}")
                    taken[n] = gi
                    if n not in names:
                        names.append(n)
        for n in names:
            p = named[n]
            # own storage (the frozen rest is shared with the teacher), row-major, in fp32: a master copy when the
            # frozen weights are bf16
            p.data = own_storage(p.data, torch.float32)
            p.requires_grad_(True)
        wd = weight_decay if group.weight_decay is None else group.weight_decay
        param_groups.append(dict(params=[named[n] for n in names], names=names, lr=lr * group.lr_scale,
                                 weight_decay=wd))
    if not taken:
        raise UsageError(f"recipe key train.unlock: nothing to train in a {type(model).__name__} "
                         f"({'; '.join(notes)})")
    return [g for g in param_groups if g["params"]]


def unlocked_table(model: torch.nn.Module, param_groups: list[dict], notes: list[str] = ()) -> str:
    total = sum(p.numel() for p in model.parameters())
    rows = [f"{'unlocked parameter':<40} {'shape':>18} {'count':>10} {'lr':>9}"]
    n_unlocked = 0
    for g in param_groups:
        for name, p in zip(g["names"], g["params"]):
            rows.append(f"{name:<40} {str(tuple(p.shape)):>18} {p.numel():>10,} {g['lr']:>9.2e}")
            n_unlocked += p.numel()
    rows.append(f"{'total unlocked':<40} {'':>18} {n_unlocked:>10,} of {total:,} ({100 * n_unlocked / total:.1f}%)")
    rows += [f"note: {n}" for n in notes]
    return "\n".join(rows)


UNLOCKED_FILE = "unlocked.txt"  # RUN/unlocked.txt: the full table, one row per unlocked tensor


def unlocked_summary(model: torch.nn.Module, param_groups: list[dict], notes: list[str] = (),
                     table: str | None = None) -> str:
    """The unlocked subset in one line (plus a line per note: parts the family lacks), for the console; the full
    table (`unlocked_table`) goes to the run folder and under `--verbose`."""
    total = sum(p.numel() for p in model.parameters())
    n = sum(p.numel() for g in param_groups for p in g["params"])
    tensors = sum(len(g["params"]) for g in param_groups)
    lrs = "/".join(dict.fromkeys(f"{g['lr']:.0e}" for g in param_groups))
    where = f"; the table: {table}" if table else ""
    rows = [f"unlocked {n:,} of {total:,} parameters ({100 * n / total:.1f}%) in {tensors} tensors, lr {lrs}{where}"]
    return "\n".join(rows + [f"note: {x}" for x in notes])
