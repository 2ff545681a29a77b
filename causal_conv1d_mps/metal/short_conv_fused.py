"""Launchers of the short_conv_fused kernels (kernels/short_conv_fused.metal), x (B, T, D), stride(2) == 1."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _contract
from ._launch import (HAS_BIAS, HAS_CU, HAS_DFINAL, HAS_INIT, HAS_MASK, RESIDUAL, as_float32, backward_launch,
                      flag, gather_states, grads_without_inputs, kernel_name, launch, optional, run_length)

FAMILY = "short_conv_fused"
# Channels per threadgroup of the backward kernel (channels are the fastest thread index).
_BWD_CHANNELS = 32


def _n_states(x: Tensor, cu_seqlens: Tensor | None) -> int:
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else x.shape[0]


def _params(x: Tensor, width: int, n_states: int, flags: int, activation: int,
            backward: bool = False) -> tuple[dict, int]:
    """The kernels' parameter slots by name (the backward's tile slots 0) and the number of (b, run, d)
    threads."""
    batch, length, dim = x.shape
    run = run_length(width, batch * dim, length, backward)
    runs = -(-length // run)
    values = dict(B=batch, D=dim, T=length, W=width, X_STRIDE_B=x.stride(0), X_STRIDE_T=x.stride(1), FLAGS=flags,
                  ACTIVATION=activation, RUN=run, RUNS=runs, N_STATES=n_states, CHANNELS=0, RUN_GROUPS=0)
    return values, batch * dim * runs


def _flags(bias, mask, init, cu_seqlens, residual: bool) -> int:
    return (flag(bias, HAS_BIAS) | flag(mask, HAS_MASK) | flag(init, HAS_INIT) | flag(cu_seqlens, HAS_CU)
            | (RESIDUAL if residual else 0))


def short_conv_fused_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None,
                         initial_states: Tensor | None, cu_seqlens: Tensor | None, activation: int,
                         residual: bool, return_final_states: bool) -> tuple[Tensor, Tensor | None]:
    batch, length, dim = x.shape
    width = weight.shape[1]
    n_states = _n_states(x, cu_seqlens)
    init = as_float32(initial_states)
    final = None  # not asked for (docs/BACKENDS.md)
    if return_final_states:
        final = gather_states(x, dim, (x.stride(0), x.stride(1), 1), length, n_states, width - 1, init, mask,
                              cu_seqlens)
    out = torch.empty((batch, length, dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out, final
    w = as_float32(weight)
    values, threads = _params(x, width, n_states, _flags(bias, mask, init, cu_seqlens, residual), activation)
    f32, i32, dev = torch.float32, torch.int32, x.device
    args = [x, w, optional(as_float32(bias), f32, dev), optional(mask, f32, dev), optional(cu_seqlens, i32, dev),
            optional(init, f32, dev), x, optional(None, f32, dev), out, _contract.pack("FUSED", **values)]
    launch(dev, FAMILY, kernel_name("short_conv_fused_fwd", x.dtype, width), args, threads)
    return out, final


def short_conv_fused_bwd(x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None,
                         initial_states: Tensor | None, cu_seqlens: Tensor | None, dout: Tensor,
                         dfinal_states: Tensor | None, activation: int,
                         residual: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    batch, length, dim = x.shape
    width = weight.shape[1]
    n_states = _n_states(x, cu_seqlens)
    init = as_float32(initial_states)
    dfinal = as_float32(dfinal_states)
    dx = torch.empty((batch, length, dim), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return dx, *grads_without_inputs(x, weight, bias, initial_states, dfinal_states, length)
    w = as_float32(weight)
    flags = _flags(bias, mask, init, cu_seqlens, residual) | flag(dfinal, HAS_DFINAL)
    values, _ = _params(x, width, n_states, flags, activation, backward=True)
    f32, i32, dev = torch.float32, torch.int32, x.device
    inputs = [x, w, optional(as_float32(bias), f32, dev), optional(mask, f32, dev), optional(cu_seqlens, i32, dev),
              optional(init, f32, dev), dout.contiguous(), optional(dfinal, f32, dev)]
    dweight, dbias, dinit = backward_launch(
        dev, FAMILY, "FUSED", x.dtype, inputs, dx, values, batch=batch, dim=dim, width=width,
        channels=_BWD_CHANNELS, weight=weight, bias=bias, initial_states=initial_states, state_rows=n_states)
    return dx, dweight, dbias, dinit
