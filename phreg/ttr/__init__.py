"""Test-time registers (Jiang et al., 2025): the training-free alternative to PH-Reg, beside it.

`find_register_neurons` finds the few MLP units that write a model's outlier tokens (`neurons.py`);
`add_test_time_registers` moves their activations onto one extra, zero-initialised token at inference, and
`save_test_time_registers` / `load_test_time_registers` keep that as the base weights' reference plus a sidecar JSON
(`model.py`, the file itself in `sidecar.py`); `use.py` resolves `--ttr SIDECAR|find` for inspect, eval, segment,
`model.teacher_ttr` and `phreg.dense_features(..., ttr=...)`. Stock timm alone does not apply the fix: the hooks live
on the model phreg builds. The public names below are imported on first use, so the torch-free sidecar checks stay
torch-free.
"""

PUBLIC = {"TestTimeRegisters": "model", "add_test_time_registers": "model", "load_test_time_registers": "model",
          "save_test_time_registers": "model", "Neuron": "neurons", "RegisterNeurons": "neurons",
          "find_register_neurons": "neurons", "outlier_mask": "neurons", "neurons_for": "use",
          "with_test_time_registers": "use", "read_sidecar": "sidecar"}
__all__ = sorted(PUBLIC)


def __getattr__(name: str):
    if name in PUBLIC:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
