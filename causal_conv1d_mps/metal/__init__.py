"""The Metal backend: the kernels of `kernels/*.metal` on Apple `mps` devices, or on the CPU through the
Linux test harness `metal_harness` (source checkout only). Implements docs/BACKENDS.md.

Each op falls back to the reference path, with one warning, when a kernel family it needs does not compile
(`_fallback.py`); `_loader.FAMILIES` and `_loader.compile_family` expose the families to the self-check.
"""
from . import _fallback, _launch, _loader
from . import causal_conv1d as _causal_conv1d
from . import short_conv_fused as _short_conv_fused
from . import short_conv_update as _short_conv_update
from ._fallback import with_fallback
from ._loader import FAMILIES, MetalCompileError, compile_family, unsupported_reason


def clear_caches() -> None:
    """Forget compiled families, kernel objects, fallback answers and warnings: the next call compiles again
    (for timing a family's compilation, or after changing CAUSAL_CONV1D_METAL_PATH's files)."""
    _loader.clear_cache()
    _fallback.clear_cache()
    _launch._kernels.clear()


causal_conv1d_fwd = with_fallback(_causal_conv1d.causal_conv1d_fwd)
causal_conv1d_bwd = with_fallback(_causal_conv1d.causal_conv1d_bwd)
short_conv_fused_fwd = with_fallback(_short_conv_fused.short_conv_fused_fwd)
short_conv_fused_bwd = with_fallback(_short_conv_fused.short_conv_fused_bwd)
short_conv_update = with_fallback(_short_conv_update.short_conv_update)
causal_conv1d_varlen_states = with_fallback(_short_conv_update.causal_conv1d_varlen_states)

__all__ = [
    "FAMILIES",
    "MetalCompileError",
    "compile_family",
    "clear_caches",
    "unsupported_reason",
    "causal_conv1d_fwd",
    "causal_conv1d_bwd",
    "short_conv_fused_fwd",
    "short_conv_fused_bwd",
    "short_conv_update",
    "causal_conv1d_varlen_states",
]
