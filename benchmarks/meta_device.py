"""The `meta` device as a dry run for the benchmarks: tensors with shapes and devices but no values.

Models on meta while the data is made on the CPU, as on a GPU run: every operation checks devices as it would there,
so a CPU tensor meeting a model tensor, or a copy back to the CPU, raises on a machine without a GPU, and so does any
read of a value (`.item()`, `if tensor`, `.tolist()`), which on a GPU is a host sync. `benchmarks/gpu_suite.py
--dry-run` and `bench_distill.py --meta` run this way; their timings mean nothing.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch


def readable(t: torch.Tensor) -> bool:
    """Whether values can be read back (meta holds shapes only)."""
    return t.device.type != "meta"


@contextlib.contextmanager
def meta_allowances():
    """The two things a step on meta needs that meta lacks, for the block's length, and nothing more: fused AdamW's
    device allow-list gains `meta` (its kernel has a meta implementation, so the optimizer step runs as on a GPU,
    `found_inf` included), and nonzero() on meta assumes every element nonzero (shapes only: reference.py's index
    assignment). Device checks are untouched: a meta tensor meeting a CPU one, or read back, still raises."""
    from torch.fx.experimental import _config as fx_config
    from torch.optim import optimizer as optim

    supported = optim._get_fused_kernels_supported_devices
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True), \
            mock.patch.object(optim, "_get_fused_kernels_supported_devices", lambda: [*supported(), "meta"]):
        yield
