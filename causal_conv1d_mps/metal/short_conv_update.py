"""Launchers of the decode step (kernels/short_conv_update.metal) and of causal_conv1d_varlen_states."""
from __future__ import annotations

import torch
from torch import Tensor

from ._launch import (CIRCULAR, HAS_BIAS, HAS_INDICES, RESIDUAL, SILU, as_float32, flag, gather_states,
                      kernel_name, launch, optional)


def short_conv_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None,
                      cache_seqlens: Tensor | None, conv_state_indices: Tensor | None, activation: bool,
                      residual: bool) -> Tensor:
    """x (B, L, D) any strides; conv_state (N, D, S) any strides, updated in place. Returns out like x."""
    batch, steps, dim = x.shape
    width = weight.shape[1]
    n_rows, _, state_len = conv_state.shape
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    w = as_float32(weight)
    flags = (flag(bias, HAS_BIAS) | flag(cache_seqlens, CIRCULAR) | flag(conv_state_indices, HAS_INDICES)
             | (SILU if activation else 0) | (RESIDUAL if residual else 0))
    params = [batch, steps, dim, width, state_len, n_rows, *x.stride(), *conv_state.stride(), *out.stride(), flags]
    f32, i32, dev = torch.float32, torch.int32, x.device
    args = [x, w, optional(as_float32(bias), f32, dev), conv_state, optional(cache_seqlens, i32, dev),
            optional(conv_state_indices, i32, dev), out, params]
    launch(x.device, kernel_name("short_conv_update", x.dtype, width), args, batch * dim)
    return out


def causal_conv1d_varlen_states(x: Tensor, cu_seqlens: Tensor, state_len: int) -> Tensor:
    """x (total_T, D) packed; (N, D, state_len): each sequence's last state_len inputs, zeros on the left."""
    total, dim = x.shape
    n_seq = cu_seqlens.shape[0] - 1
    return gather_states(x, dim, (0, x.stride(0), x.stride(1)), total, n_seq, state_len, cu_seqlens=cu_seqlens)
