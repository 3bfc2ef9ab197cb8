"""The kernel engine: Llama-family inference on numpy (the oracle), numba (CPU) and CuPy (GPU).

The serving layer meets it only in `runner.py` (StepInput, ModelRunner,
load_runner, estimate_weight_bytes, KernelConfigError) and `sampling.py`.
"""
