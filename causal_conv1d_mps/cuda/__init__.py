"""CUDA C++ kernels for `causal_conv1d` in the `(B, D, T)` layout, compiled at first use through NVRTC.

They serve the calls they apply to (`launch.why_not`) inside the Triton backend on NVIDIA GPUs; every other
call, and every call where NVRTC is missing or `CAUSAL_CONV1D_CUDA_KERNELS=0`, uses the Triton kernels.
CI runs the same `.cu` source on the CPU through `cuda_harness/` (docs/CUDA_HARNESS.md).
"""
from . import launch
from ._runtime import enabled, unavailable_reason

__all__ = ["enabled", "launch", "unavailable_reason"]
