"""`ShortConvolution`: a drop-in module over the fused short convolution and its decode step."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _activation
from .api import _short_conv_fused, _short_conv_update


class ShortConvolution(nn.Module):
    """Causal depthwise conv over `[B, T, D]` with optional bias, SiLU and residual (Canon layers, Mamba and
    linear-attention short convs).

    Parameters: `weight` `[D, W]` and `bias` `[D]`, initialised like `nn.Conv1d(D, D, W, groups=D)`.
    A cache is a conv state `[B, D, W-1]` (`[N, D, W-1]` with `cu_seqlens`).
    `context_parallel` (a `causal_conv1d_mps.context_parallel.ContextParallel` or a process group; also
    settable later as an attribute) makes `forward` take this rank's slice of a sequence split over time.
    """

    def __init__(self, hidden_size: int, kernel_size: int = 4, bias: bool = False, activation: str | None = "silu",
                 residual: bool = False, device=None, dtype=None, context_parallel=None):
        super().__init__()
        self.context_parallel = context_parallel
        if kernel_size < 1:
            raise ValueError(f"kernel_size: expected an int >= 1, got {kernel_size!r}")
        self.hidden_size = hidden_size
        self.kernel_size = kernel_size
        self.activation_code = _activation.code(activation)
        self.activation = activation
        self.residual = residual
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(hidden_size, kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(hidden_size, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d(D, D, W, groups=D): kaiming_uniform_(a=sqrt(5)) on fan_in = W, i.e. U(-1/sqrt(W), 1/sqrt(W)).
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, kernel_size={self.kernel_size}, bias={self.bias is not None}, "
                f"activation={self.activation!r}, residual={self.residual}")

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, cache: Tensor | None = None,
                output_final_state: bool = False, cu_seqlens: Tensor | None = None):
        """`x` `[B, T, D]` -> `(y [B, T, D], new_cache)`. A given `cache` serves as the initial states; the new
        cache is returned when `output_final_state` is true or a cache was given, else None."""
        want_cache = output_final_state or cache is not None
        if self.context_parallel is not None:
            from . import context_parallel as cp
            result = cp.short_conv_fused(x, self.weight, self.bias, attention_mask, self.activation, self.residual,
                                         initial_states=cache, return_final_states=want_cache,
                                         cu_seqlens=cu_seqlens, context=self.context_parallel)
            return result if want_cache else (result, None)
        # errors about the cache name it `cache`, the argument the caller passed
        result = _short_conv_fused(x, self.weight, self.bias, attention_mask, self.activation_code, self.residual,
                                   cache, want_cache, cu_seqlens, states_name="cache")
        return result if want_cache else (result, None)

    def step(self, x: Tensor, cache: Tensor):
        """Decodes `x` `[B, D]` or `[B, L, D]`; `cache` `[B, D, S]` (S >= W-1) is updated in place."""
        y = _short_conv_update(x, cache, self.weight, self.bias, None, self.activation_code, self.residual, None,
                               state_name="cache")
        return y, cache
