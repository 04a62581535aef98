"""student -> loss -> step: the parts a training step needs and the step itself, built the same way for `distill` and
for the benchmarks (`benchmarks/bench_distill.py` times exactly this `train_step`).

HF Accelerate does the device placement, bf16 autocast, gradient sync and accumulation; the optimizer is fused AdamW
over the unlocked tensors only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

from ..backbones import PatchTokens, add_registers, patch_tokens
from ..backbones.attention import set_fused_attention
from ..config.recipe import Recipe, TrainCfg
from ..models.loading import frozen_dtype, load_teacher, normalization
from ..targets.teacher import DenoisedTeacher
from .loss import distill_loss
from .speed import compile_options, teacher_autocast, use_compile
from .unlock import unlock


def lr_factor(cfg: TrainCfg, total_steps: int):
    """Multiplier of each group's base lr at optimizer step t: linear warmup, then exp / cosine / constant."""
    end = cfg.end_lr / cfg.lr

    def factor(t: int) -> float:
        if t < cfg.warmup_steps:
            return (t + 1) / cfg.warmup_steps
        p = min(1.0, (t - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        if cfg.schedule == "exp":
            return end ** p
        if cfg.schedule == "cosine":
            return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * p))
        return 1.0

    return factor


def make_accelerator(recipe: Recipe, cpu: bool = False, run: Path | None = None) -> Accelerator:
    """bf16 autocast on GPU (fp32 master weights and loss), fp32 on CPU; `train.trackers` through Accelerate's own
    tracker support, logging under RUN/logs (TensorBoard: RUN/logs/phreg/). torch.compile is not Accelerate's
    (its dynamo plugin compiles *around* its autocast wrapper, whose closure then guards every call): the student
    compiles inside (`StudentTokens`), the teacher on its own (`DenoisedTeacher`)."""
    gpu = torch.cuda.is_available() and not cpu
    cpu = cpu or not gpu  # Accelerate only sees `torchrun` processes on a GPU-less machine as MULTI_CPU when told
    precision = recipe.train.precision
    if precision == "auto":
        precision = "bf16" if gpu else "fp32"
    return Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=cpu,
                       gradient_accumulation_steps=recipe.train.grad_accum,
                       dataloader_config=DataLoaderConfiguration(non_blocking=True),
                       log_with=list(recipe.train.trackers) if run is not None and recipe.train.trackers else None,
                       project_config=ProjectConfiguration(project_dir=str(run), logging_dir=str(run / "logs"))
                       if run is not None else None)


def student_forward(tokens: PatchTokens, images: torch.Tensor) -> torch.Tensor:
    """The student's patch tokens: the code object torch.compile caches the student's graph on (the teacher has its
    own, `phreg.targets.teacher.teacher_forward`), entered always with grad on and the run's autocast."""
    return patch_tokens(tokens.model, images, tokens.tap, tokens.sigma)


class StudentTokens(PatchTokens):
    """The student read through its dense head: what the loss sees and what Accelerate wraps (DDP, autocast).

    With `compile` (torch.compile's arguments, `phreg.distill.speed.compile_options`; None = eager), its forward runs
    `student_forward` compiled for one static shape *below* Accelerate's wrappers, so the compiled frame sees a stable
    grad mode and autocast state (Accelerate's own dynamo plugin compiles around its autocast wrapper). The batch never
    changes size in training (`phreg.distill.session.drop_partial_batch`), so it never recompiles.
    """

    def __init__(self, model: torch.nn.Module, tap: str = "final", sigma: float = 5.0, compile: dict | None = None):
        super().__init__(model, tap, sigma)
        self._compiled = torch.compile(student_forward, **compile) if compile is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._compiled(self, x) if self._compiled is not None else super().forward(x)


@dataclass
class Parts:
    """Everything a step needs: the frozen teacher behind its targets, the student and what trains of it."""
    targets: DenoisedTeacher  # the frozen teacher (`targets.teacher`) -> TTA-denoised patch targets
    student: torch.nn.Module  # the timm student (what is exported)
    student_tokens: PatchTokens  # the student read through its dense head: what the loss sees and Accelerate wraps
    groups: list[dict]  # optimizer groups of the unlocked tensors (with their names)
    optimizer: torch.optim.Optimizer
    mean: tuple
    std: tuple
    notes: list = field(default_factory=list)  # semantic unlock parts the model lacks
    teacher_ttr: dict | None = None  # the test-time registers the targets were read with (`model.teacher_ttr`)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.groups for p in g["params"]]


def build_parts(recipe: Recipe, device: torch.device, precision: str = "fp32", files: list | None = None) -> Parts:
    """`files`: the training images, read (the first 16, center crops) only when `model.teacher_ttr` is "find"."""
    m, cfg, speed = recipe.model, recipe.train, recipe.speed
    # first, so the student's frozen tensors are the teacher's on the device too (bf16 with speed.frozen_dtype: bf16)
    teacher = load_teacher(m, frozen_dtype(speed), recipe.views).to(device)
    mean, std = normalization(teacher, m)
    student = add_registers(teacher, m.registers, m.register_init, m.register_noise, recipe.seed)
    for model in (teacher, student):
        set_fused_attention(model, speed.fused_attn)
    student.set_grad_checkpointing(speed.grad_checkpointing)  # timm recomputes each block in backward
    notes: list[str] = []
    groups = unlock(student, cfg.unlock, cfg.lr, cfg.weight_decay, notes)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                  fused=True)
    reads, ttr = teacher_with_ttr(teacher, m, files or [], mean, std, device)
    compile_ = compile_options(speed) if use_compile(speed, device) else None
    targets = DenoisedTeacher(reads, recipe.views, mean, std, teacher_autocast(speed, device, precision),
                              compile=compile_, head=m.teacher_head, sigma=m.naclip_sigma, batch=cfg.batch_size)
    return Parts(targets.to(device), student, StudentTokens(student, m.student_head, m.naclip_sigma, compile_),
                 groups, optimizer, mean, std, notes, ttr)
def teacher_with_ttr(teacher: torch.nn.Module, m, files: list, mean, std, device) -> tuple[torch.nn.Module, dict | None]:
    """The model the targets are read from: the teacher, or with `model.teacher_ttr` the teacher with test-time
    registers (its neurons found on the first training images, or read from a sidecar), so that the targets are
    denoised from a teacher without its artifacts. The student is built from the plain teacher either way. With no
    register neurons (a clean teacher) the targets are the plain teacher's."""
    if m.teacher_ttr == "none":
        return teacher, None
    from ..data.images import ImageDataset
    from ..ttr.model import add_test_time_registers
    from ..ttr.use import FIND_IMAGES, neurons_for, neurons_record

    def images() -> torch.Tensor:
        return ImageDataset(files[:FIND_IMAGES], m.img_size, mean, std, train=False).images().to(device)
    neurons = neurons_for(m.teacher_ttr, teacher, images if files else None)
    record = neurons_record(neurons, m.teacher_ttr)
    if not record["count"]:  # a clean teacher: nothing to move, so the targets are the plain teacher's
        return teacher, record
    return add_test_time_registers(teacher, neurons), record


def skip_if_nonfinite(optimizer, grad_norm: torch.Tensor) -> torch.Tensor:
    """Fused AdamW skips its whole update, on device, when `found_inf` is 1 (the protocol torch's GradScaler uses),
    so a NaN/inf step is dropped without a host sync. The global grad norm is identical on every DDP rank."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.found_inf = (~torch.isfinite(grad_norm)).float()
    return inner.found_inf


def train_step(acc: Accelerator, student_tokens, targets: DenoisedTeacher, optimizer, params, batch: dict,
               cfg: TrainCfg) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-batch: uint8 pixels normalized on the device, targets (cached, or the teacher's views), student
    forward, loss, backward; on the last micro-batch of a step, clip and update. Returns the loss and, on update steps,
    the non-finite flag (on device)."""
    found_inf = None
    with acc.accumulate(student_tokens):
        images = targets.normalize(batch["pixels"])
        target = batch["target"] if "target" in batch else targets(images, batch["plan"])
        loss = distill_loss(student_tokens(images), target, cfg.mse_weight)
        acc.backward(loss)
        if acc.sync_gradients:
            found_inf = skip_if_nonfinite(optimizer, acc.clip_grad_norm_(params, cfg.grad_clip or float("inf")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), found_inf
