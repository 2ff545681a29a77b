"""Triton device code only (no allocation, no grids): one module per kernel family.

This package is imported twice at most: as itself (compiled kernels, for cuda tensors) and under a
private name with Triton's interpreter switched on (for cpu tensors); see `.._loader`.
"""
from .conv_bwd import conv_bwd_initial_state_kernel, conv_bwd_kernel, reduce_partials_kernel
from .common import loop_probe_kernel
from .conv_bwd_runs import conv_bwd_runs_kernel
from .conv_fwd import conv_fwd_kernel
from .conv_fwd_runs import conv_fwd_runs_kernel
from .states import gather_states_kernel
from .update import short_conv_update_kernel

__all__ = [
    "conv_bwd_initial_state_kernel", "conv_bwd_kernel", "conv_bwd_runs_kernel", "conv_fwd_kernel",
    "conv_fwd_runs_kernel", "gather_states_kernel",
    "loop_probe_kernel", "reduce_partials_kernel", "short_conv_update_kernel",
]
