"""What a run will hold in memory, printed before it starts, so a model that cannot fit fails in the first second.

The student's frozen tensors are the teacher's own (`phreg.backbones`), so weights count once (in bf16 with
`speed.frozen_dtype: bf16`); only the unlocked tensors have a second (fp32) copy, a gradient and two AdamW moments.
On a CPU the estimate is of the process's resident memory, so it also counts what the process held before the model
was loaded (Python, torch, timm: ~0.77 GB with a CUDA build of torch), and a CPU run hands freed activations back to
the OS (`return_freed_memory`) so that what is resident is what is alive; on a GPU it is of the allocator's peak.
Activations are what autograd keeps per image for the student's backward (every block, because gradients flow to the
unlocked embeddings below them; one block's input only with `speed.grad_checkpointing`) plus the teacher's no-grad
working set for the views of one forward chunk. The activation figures are estimates (elementwise buffers of a
pre-norm ViT block with fused SDPA attention), not measurements: `benchmarks/gpu_suite.sh` measures the allocator's
peak. They count the inputs of every linear layer, which torch keeps only where the weight trains: in fp32 on a CPU
DINOv2-L keeps ~0.28 GB of the 0.46 GB counted, so the estimate of its 1-step run is 12% high (docs/scale.md);
bf16 autocast on a GPU keeps other copies, which no GPU has measured here.

`plan(recipe)` builds the model on the `meta` device (no weights, no memory) and estimates a run that has not
started: `phreg estimate RECIPE` prints it, e.g. for DINOv3 ViT-7B/16 on a machine that has never seen its weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbones import backbone
from ..targets.teacher import teacher_view_bytes


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def block_activation_elems(tokens: int, dim: int, hidden: int) -> int:
    """Elements autograd keeps for one pre-norm block: norm1 in/out, qkv, attention out, proj out, norm2 in/out,
    fc1 out, activation out, fc2 out (fused SDPA keeps no L x L matrix)."""
    return tokens * (9 * dim + 2 * hidden)


@dataclass
class MemoryEstimate:
    weights: int  # the teacher's tensors (shared with the student)
    unlocked: int  # the student's own copies of its unlocked tensors
    optimizer: int  # their gradients and AdamW's two moments
    student_per_image: int  # activations kept for backward, one image
    teacher_per_view: int  # no-grad working set of one view in the teacher's forward
    views: int
    batch: int
    chunk: int = 0  # views per teacher forward (`views.chunk`, auto: what fits); 0: all of a batch's views at once
    runtime: int = 0  # resident memory before the model was loaded (CPU: Python, torch, libraries); 0 on a GPU

    @property
    def at_once(self) -> int:
        """Teacher views in one forward."""
        return min(self.chunk or self.batch * self.views, self.batch * self.views)

    @property
    def total(self) -> int:
        return (self.runtime + self.weights + self.unlocked + self.optimizer + self.batch * self.student_per_image
                + self.at_once * self.teacher_per_view)

    def line(self) -> str:
        gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
        return (f"memory estimate: weights {gb(self.weights)} (teacher, shared with the student) + unlocked copies "
                f"{gb(self.unlocked)}; gradients + AdamW {gb(self.optimizer)}; activations per image "
                f"{self.student_per_image / 1e6:.0f} MB (student); teacher {self.teacher_per_view / 1e6:.0f} MB per "
                f"view, {self.at_once} of the batch's "
                f"{self.batch} x {self.views} views per forward"
                + (f"; process before the model {gb(self.runtime)}" if self.runtime else "")
                + f"; batch {self.batch}: ~{gb(self.total)}")


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Have glibc's malloc hand every freed block of `threshold` bytes or more back to the OS at once (`mallopt
    M_MMAP_THRESHOLD`, mallopt(3)); True where it took effect (Linux with glibc).

    By default glibc raises its mmap threshold to the size of each large block freed (up to 32 MB), so after the
    first few frees a CPU step's activations (1-5 MB each for ViT-L at 224 px) come from the heap, whose holes
    between live tensors stay resident: 0.17 GB of a 1-step DINOv2-L run's 2.57 GB peak. A fixed threshold ends
    that sliding: each such tensor is its own mapping, unmapped when freed, so the peak is what is alive. The cost
    is a page fault per 4 KB when that memory is used again: not measurable against a ViT-L step on 2 cores
    (docs/scale.md). Called before the model is loaded, so that no heap full of freed blocks is reused first."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    m_mmap_threshold = -3  # <malloc.h>
    return ctypes.CDLL(None).mallopt(m_mmap_threshold, threshold) == 1


def resident_bytes() -> int:
    """This process's resident memory now (Linux; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096
    except (OSError, ValueError, IndexError):
        return 0


def estimate(teacher: torch.nn.Module, student: torch.nn.Module, groups: list[dict], views: int, batch: int,
             bf16: bool, checkpointing: bool, chunk: int = 0, runtime: int = 0) -> MemoryEstimate:
    unlocked = [p for g in groups for p in g["params"]]
    act = 2 if bf16 else 4
    dim, depth = student.embed_dim, len(student.blocks)
    hidden = backbone(student).mlp_width  # SwiGLU has fc1_g + fc1_x, no fc1
    s_tokens = student.patch_embed.num_patches + student.num_prefix_tokens
    per_block = block_activation_elems(s_tokens, dim, hidden)
    kept = (depth * s_tokens * dim + per_block) if checkpointing else depth * per_block
    return MemoryEstimate(weights=_bytes(teacher.parameters()) + _bytes(teacher.buffers()),
                          unlocked=_bytes(unlocked), optimizer=3 * _bytes(unlocked),
                          student_per_image=kept * act, teacher_per_view=teacher_view_bytes(teacher, bf16),
                          views=views, batch=batch, chunk=chunk, runtime=runtime)


def plan(recipe, gpu: bool = True, runtime: int = 0) -> MemoryEstimate:
    """The estimate of a run of `recipe` before it starts, the model built on the `meta` device (architecture only:
    no weights are read, nothing is allocated). `gpu`: bf16 autocast (the recipe's train.precision auto) and the
    recipe's `views.chunk` (0 counts all of a batch's views in one teacher forward: the worst case)."""
    from ..backbones import add_registers
    from ..models.loading import build_model, frozen_dtype
    from .unlock import unlock

    m, cfg = recipe.model, recipe.train
    teacher = build_model(m.name, pretrained=False, device="meta", img_size=m.img_size)
    dtype = frozen_dtype(recipe.speed)
    for p in teacher.parameters() if dtype is not None else ():
        if p.ndim == 2:  # as `load_teacher` holds them: the linear layers' matrices
            p.data = p.data.to(dtype)
    student = add_registers(teacher, m.registers, "randn", m.register_noise, recipe.seed)  # same bytes, no values
    groups = unlock(student, cfg.unlock, cfg.lr, cfg.weight_decay, [])
    bf16 = cfg.precision == "bf16" or (gpu and cfg.precision == "auto")
    return estimate(teacher, student, groups, recipe.views.num, cfg.batch_size, bf16, recipe.speed.grad_checkpointing,
                    recipe.views.chunk, runtime)
