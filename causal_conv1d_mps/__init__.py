"""Fast causal depthwise 1-D convolution ("short convolution") for PyTorch.

Metal kernels on Apple Silicon (`mps`), Triton kernels on NVIDIA (`cuda`), a PyTorch reference on CPU;
one API. See the README and docs/CONTRACT.md for the contract.
"""
from . import ops, reference
from .api import (causal_conv1d, causal_conv1d_fn, causal_conv1d_fwd, causal_conv1d_update,
                  causal_conv1d_varlen_states, short_conv_fused, short_conv_fused_fwd_only, short_conv_update,
                  short_conv_update_fwd_only)
from .modules import ShortConvolution

__version__ = "0.1.0"

__all__ = [
    "causal_conv1d", "causal_conv1d_fn", "causal_conv1d_fwd", "causal_conv1d_update", "causal_conv1d_varlen_states",
    "short_conv_fused", "short_conv_fused_fwd_only", "short_conv_update", "short_conv_update_fwd_only",
    "ShortConvolution", "ops", "reference", "__version__",
]
