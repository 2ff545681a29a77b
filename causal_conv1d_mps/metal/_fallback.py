"""A kernel family that fails to compile is a fallback, never a crash.

Each op of the Metal backend names the kernel families it launches. Before its first launch on a device
and dtype, those families are compiled (lazily, each once) and checked for every kernel the launchers call.
If one fails (`MetalCompileError`: compile_shader raised, a kernel is missing from `dir(lib)`, or a pipeline
cannot run the threadgroup size a kernel needs), the op runs `causal_conv1d_mps.reference`'s function of
the same name on the same device instead, with one RuntimeWarning per failure that quotes the compiler's
first error line. Ops of the other families keep their kernels.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Callable

from ._loader import SOURCE_ENV_VAR, MetalCompileError, family_library

# Op name -> the kernel families its launchers use.
OP_FAMILIES: dict[str, tuple[str, ...]] = {
    "causal_conv1d_fwd": ("causal_conv1d", "states"),
    "causal_conv1d_bwd": ("causal_conv1d", "states"),
    "short_conv_fused_fwd": ("short_conv_fused", "states"),
    "short_conv_fused_bwd": ("short_conv_fused", "states"),
    "short_conv_update": ("short_conv_update",),
    "causal_conv1d_varlen_states": ("states",),
}

# (op, device type, source override, dtype) -> None (kernels ready) or the failure.
_status: dict[tuple, MetalCompileError | None] = {}
_warned: set[tuple] = set()


def _warn(exc: MetalCompileError, op: str, device_type: str) -> None:
    key = (exc.family, device_type, exc.first_line)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"causal_conv1d_mps: the Metal kernel family {exc.family!r} cannot be used on {device_type} "
                  f"({exc.first_line}); {op} and the other ops that need it use the PyTorch reference path "
                  f"instead", RuntimeWarning, stacklevel=4)


def _key(op: str, x) -> tuple:
    return (op, x.device.type, os.environ.get(SOURCE_ENV_VAR, ""), x.dtype)


def _ready(op: str, x) -> MetalCompileError | None:
    key = _key(op, x)
    if key not in _status:
        status = None
        try:
            for family in OP_FAMILIES[op]:
                family_library(x.device, family, x.dtype)
        except MetalCompileError as exc:
            status = exc
        _status[key] = status
    return _status[key]


def with_fallback(impl: Callable) -> Callable:
    """`impl` (a Metal op whose first argument is x), or the reference function of the same name when a
    family it needs is unusable."""
    op = impl.__name__

    @functools.wraps(impl)
    def run(x, *args, **kwargs):
        failure = _ready(op, x)
        if failure is None:
            try:
                return impl(x, *args, **kwargs)
            except MetalCompileError as exc:  # raised before its first launch (pipeline limits)
                failure = _status[_key(op, x)] = exc
        _warn(failure, op, x.device.type)
        # Imported only when needed: the kernels' path never depends on the reference module.
        reference = importlib.import_module("causal_conv1d_mps.reference")
        return getattr(reference, op)(x, *args, **kwargs)

    return run


def clear_cache() -> None:
    """Forget readiness answers and warnings (tests that change the sources use this)."""
    _status.clear()
    _warned.clear()
