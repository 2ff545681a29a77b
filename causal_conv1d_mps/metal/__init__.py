"""The Metal backend: the kernels of `kernels/*.metal` on Apple `mps` devices, or on the CPU through the
Linux test harness `metal_harness` (source checkout only). Implements docs/BACKENDS.md."""
from ._loader import unsupported_reason
from .causal_conv1d import causal_conv1d_bwd, causal_conv1d_fwd
from .short_conv_fused import short_conv_fused_bwd, short_conv_fused_fwd
from .short_conv_update import causal_conv1d_varlen_states, short_conv_update

__all__ = [
    "unsupported_reason",
    "causal_conv1d_fwd",
    "causal_conv1d_bwd",
    "short_conv_fused_fwd",
    "short_conv_fused_bwd",
    "short_conv_update",
    "causal_conv1d_varlen_states",
]
