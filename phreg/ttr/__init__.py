"""Test-time registers (Jiang et al., 2025): the training-free alternative to PH-Reg, beside it.

`find_register_neurons` finds the few MLP units that write a model's outlier tokens (`neurons.py`);
`add_test_time_registers` moves their activations onto one extra, zero-initialised token at inference, and
`save_test_time_registers` / `load_test_time_registers` keep that as the base weights' reference plus a sidecar JSON
(`model.py`); `use.py` resolves `--ttr SIDECAR|find` for inspect, eval, segment, `model.teacher_ttr` and
`phreg.dense_features(..., ttr=...)`. Stock timm alone does not apply the fix: the hooks live on the model phreg builds.
"""

from .model import (TestTimeRegisters, add_test_time_registers, load_test_time_registers,  # noqa: F401
                    save_test_time_registers)
from .neurons import Neuron, RegisterNeurons, find_register_neurons, outlier_mask  # noqa: F401
from .use import neurons_for, read_sidecar, with_test_time_registers  # noqa: F401
