"""Launchers of the decode step (kernels/short_conv_update.metal) and of causal_conv1d_varlen_states."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _contract
from ._launch import (CIRCULAR, HAS_BIAS, HAS_INDICES, RESIDUAL, as_float32, flag, gather_states,
                      kernel_name, launch, optional)

FAMILY = "short_conv_update"


def short_conv_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None,
                      cache_seqlens: Tensor | None, conv_state_indices: Tensor | None, activation: int,
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
             | (RESIDUAL if residual else 0))
    xs, ss, os_ = x.stride(), conv_state.stride(), out.stride()
    params = _contract.pack("UPDATE", B=batch, L=steps, D=dim, W=width, S=state_len, N=n_rows, X_STRIDE_B=xs[0],
                            X_STRIDE_L=xs[1], X_STRIDE_D=xs[2], STATE_STRIDE_N=ss[0], STATE_STRIDE_D=ss[1],
                            STATE_STRIDE_S=ss[2], OUT_STRIDE_B=os_[0], OUT_STRIDE_L=os_[1], OUT_STRIDE_D=os_[2],
                            FLAGS=flags, ACTIVATION=activation)
    f32, i32, dev = torch.float32, torch.int32, x.device
    # An empty conv_state (N == 0 or S == 0) is never touched: every row is padding, or there is no column.
    args = [x, w, optional(as_float32(bias), f32, dev), optional(conv_state, x.dtype, dev),
            optional(cache_seqlens, i32, dev), optional(conv_state_indices, i32, dev), out, params]
    launch(dev, FAMILY, kernel_name("short_conv_update", x.dtype, width), args, batch * dim)
    return out


def causal_conv1d_varlen_states(x: Tensor, cu_seqlens: Tensor, state_len: int) -> Tensor:
    """x (total_T, D) packed; (N, D, state_len): each sequence's last state_len inputs, zeros on the left."""
    total, dim = x.shape
    n_seq = cu_seqlens.shape[0] - 1
    return gather_states(x, dim, (0, x.stride(0), x.stride(1)), total, n_seq, state_len, cu_seqlens=cu_seqlens)
