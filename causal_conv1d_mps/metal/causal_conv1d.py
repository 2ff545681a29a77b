"""Launchers of the causal_conv1d kernels (kernels/causal_conv1d.metal), x (B, D, T) in either layout."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _contract
from ._launch import (HAS_BIAS, HAS_DFINAL, HAS_INIT, HAS_SEQ, as_float32, backward_launch, flag, gather_states,
                      grads_without_inputs, kernel_name, launch, optional, run_length)

FAMILY = "causal_conv1d"


def _params(x: Tensor, dout: Tensor | None, width: int, flags: int, activation: int) -> tuple[dict, int]:
    """The kernels' parameter slots by name (the backward's tile slots 0) and the number of (b, d, run)
    threads (backward when `dout` is given)."""
    batch, dim, length = x.shape
    run = run_length(width, batch * dim, length, backward=dout is not None)
    runs = -(-length // run)
    g = dout if dout is not None else x
    values = dict(B=batch, D=dim, T=length, W=width, X_STRIDE_B=x.stride(0), X_STRIDE_D=x.stride(1),
                  X_STRIDE_T=x.stride(2), G_STRIDE_B=g.stride(0), G_STRIDE_D=g.stride(1), G_STRIDE_T=g.stride(2),
                  FLAGS=flags, ACTIVATION=activation, RUN=run, CHANNEL_LAST=int(not x.is_contiguous()), RUNS=runs, N_STATES=batch,
                  CHANNELS=0, RUN_GROUPS=0)
    return values, batch * dim * runs


def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None,
                      initial_states: Tensor | None, activation: int,
                      return_final_states: bool) -> tuple[Tensor, Tensor | None]:
    batch, dim, length = x.shape
    width = weight.shape[1]
    init = as_float32(initial_states)
    final = None  # not asked for (docs/BACKENDS.md)
    if return_final_states:
        final = gather_states(x, dim, (x.stride(0), x.stride(2), x.stride(1)), length, batch, width - 1, init)
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out, final
    w = as_float32(weight)
    flags = flag(bias, HAS_BIAS) | flag(seq_idx, HAS_SEQ) | flag(init, HAS_INIT)
    values, threads = _params(x, None, width, flags, activation)
    f32, dev = torch.float32, x.device
    args = [x, w, optional(as_float32(bias), f32, dev), optional(seq_idx, torch.int32, dev), optional(init, f32, dev),
            x, optional(None, f32, dev), out, _contract.pack("CONV", **values)]
    launch(dev, FAMILY, kernel_name("causal_conv1d_fwd", x.dtype, width), args, threads)
    return out, final


def causal_conv1d_bwd(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None,
                      initial_states: Tensor | None, dout: Tensor, dfinal_states: Tensor | None,
                      activation: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    batch, dim, length = x.shape
    width = weight.shape[1]
    init = as_float32(initial_states)
    dfinal = as_float32(dfinal_states)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx, *grads_without_inputs(x, weight, bias, initial_states, dfinal_states, length)
    w = as_float32(weight)
    flags = flag(bias, HAS_BIAS) | flag(seq_idx, HAS_SEQ) | flag(init, HAS_INIT) | flag(dfinal, HAS_DFINAL)
    values, _ = _params(x, dout, width, flags, activation)
    f32, dev = torch.float32, x.device
    inputs = [x, w, optional(as_float32(bias), f32, dev), optional(seq_idx, torch.int32, dev),
              optional(init, f32, dev), dout, optional(dfinal, f32, dev)]
    # Channel-last: 32 channels x 8 runs per threadgroup (coalesced over D); contiguous: 8 x 32.
    channels = 32 if values["CHANNEL_LAST"] else 8
    dweight, dbias, dinit = backward_launch(
        dev, FAMILY, "CONV", x.dtype, inputs, dx, values, batch=batch, dim=dim, width=width, channels=channels,
        weight=weight, bias=bias, initial_states=initial_states, state_rows=batch)
    return dx, dweight, dbias, dinit
