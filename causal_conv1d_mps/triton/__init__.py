"""Triton backend: every op of docs/BACKENDS.md as Triton kernels, for cuda tensors (and ROCm where
Triton runs); on cpu tensors the same kernels run in Triton's interpreter (tests, debugging).

Layout: `kernels/` holds device code only; `launch_*.py` allocate, pick tiles and launch; `backend.py`
maps the six backend functions onto the launchers. Importing this package does not import triton:
`unsupported_reason` says whether it can run, and the functions load on first use.
"""
from __future__ import annotations

import importlib.util

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FUNCTIONS = ("causal_conv1d_fwd", "causal_conv1d_bwd", "short_conv_fused_fwd", "short_conv_fused_bwd",
              "short_conv_update", "causal_conv1d_varlen_states")
# The kernels unroll their tap loops: compile time grows faster than W. On an H200's host the first forward +
# backward with initial states took 18.5 s to compile at W = 16, 35 s at W = 24, more than 90 s at W = 32,
# and a W = 257 specialisation had not finished after 400 s. Filters wider than this are served by the
# reference path (PyTorch's convolution) on the same device: each function of `backend.py` that takes a
# filter tests its width (a wrapper's frame here cost about 0.3 us per call).
MAX_WIDTH = 24


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the Triton kernels can run on (device, x dtype); otherwise why not."""
    if dtype not in _DTYPES:
        return (f"the Triton kernels take float32, float16 or bfloat16 inputs, got {dtype} "
                f"(float64 is served by the reference path)")
    if device.type not in ("cuda", "cpu"):
        return f"Triton runs on cuda (and on cpu through its interpreter), not on {device.type}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cpu":
        from ._loader import interpreter_problem

        return interpreter_problem()
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.version.hip is None:
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"bfloat16 needs an NVIDIA GPU of compute capability 8.0 or newer, got {major}.x"
    return None


def serves_width(width: int) -> bool:
    """Whether the Triton kernels serve a filter of `width` taps (wider ones: the reference path, by design)."""
    return width <= MAX_WIDTH


def __getattr__(name: str):
    # first use of a backend function imports triton and the launchers, then binds them here
    if name in _FUNCTIONS:
        from . import backend

        for fn_name in _FUNCTIONS:
            globals()[fn_name] = getattr(backend, fn_name)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["unsupported_reason", "serves_width", "MAX_WIDTH", *_FUNCTIONS]
