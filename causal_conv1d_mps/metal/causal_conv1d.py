"""Launchers of the causal_conv1d kernels (kernels/causal_conv1d.metal), x (B, D, T) in either layout."""
from __future__ import annotations

import torch
from torch import Tensor

from ._launch import (GROUP, HAS_BIAS, HAS_DFINAL, HAS_INIT, HAS_SEQ, SILU, as_float32, flag, gather_states,
                      kernel_name, launch, optional, reduce_rows, run_length)


def _params(x: Tensor, dout: Tensor | None, width: int, flags: int) -> tuple[list[int], int]:
    """The kernels' int64 params and the number of (b, d, run) threads (backward when `dout` is given)."""
    batch, dim, length = x.shape
    run = run_length(width, batch * dim, length, backward=dout is not None)
    runs = -(-length // run)
    channel_last = not x.is_contiguous()
    g = dout if dout is not None else x
    params = [batch, dim, length, width, *x.stride(), *g.stride(), flags, run, int(channel_last), runs, batch]
    return params, batch * dim * runs


def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None,
                      initial_states: Tensor | None, silu: bool, return_final_states: bool) -> tuple[Tensor, Tensor]:
    batch, dim, length = x.shape
    width = weight.shape[1]
    init = as_float32(initial_states, like=x.dtype)
    final = x.new_empty(0)
    if return_final_states:
        final = gather_states(x, dim, (x.stride(0), x.stride(2), x.stride(1)), length, batch, width - 1, init)
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out, final
    w = as_float32(weight)
    flags = flag(bias, HAS_BIAS) | flag(seq_idx, HAS_SEQ) | flag(init, HAS_INIT) | (SILU if silu else 0)
    params, threads = _params(x, None, width, flags)
    f32, dev = torch.float32, x.device
    args = [x, w, optional(as_float32(bias), f32, dev), optional(seq_idx, torch.int32, dev), optional(init, f32, dev),
            x, optional(None, f32, dev), out, params]
    launch(x.device, kernel_name("causal_conv1d_fwd", x.dtype, width), args, threads)
    return out, final


def causal_conv1d_bwd(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None,
                      initial_states: Tensor | None, dout: Tensor, dfinal_states: Tensor | None,
                      silu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, dim, length = x.shape
    width = weight.shape[1]
    init = as_float32(initial_states, like=x.dtype)
    dfinal = as_float32(dfinal_states)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx, *_grads_without_inputs(x, weight, bias, initial_states, dfinal_states)
    w = as_float32(weight)
    flags = (flag(bias, HAS_BIAS) | flag(seq_idx, HAS_SEQ) | flag(init, HAS_INIT) | (SILU if silu else 0)
             | flag(dfinal, HAS_DFINAL))
    params, _ = _params(x, dout, width, flags)
    f32, dev = torch.float32, x.device
    inputs = [x, w, optional(as_float32(bias), f32, dev), optional(seq_idx, torch.int32, dev),
              optional(init, f32, dev), dout, optional(dfinal, f32, dev)]
    # One pass: dx, and per threadgroup (channels x runs) one float32 partial row of dweight/dbias; then a
    # fixed-order sum of the rows (deterministic).
    channels = 32 if params[12] else 8
    runs = params[13]
    run_groups = -(-runs // (GROUP // channels))
    part = torch.empty((batch * run_groups, dim, width + 1), dtype=torch.float32, device=dev)
    groups = batch * -(-dim // channels) * run_groups
    launch(dev, kernel_name("causal_conv1d_bwd", x.dtype, width),
           [*inputs, dx, part, params + [channels, run_groups]], groups * GROUP, GROUP)
    sums = reduce_rows(part.view(batch * run_groups, dim * (width + 1))).view(dim, width + 1)
    dweight = sums[:, :width].contiguous().to(weight.dtype)
    dbias = sums[:, width].to(bias.dtype) if bias is not None else x.new_empty(0)

    dinit = x.new_empty(0)
    if initial_states is not None:
        dinit = torch.empty((batch, dim, width - 1), dtype=torch.float32, device=dev)
        launch(dev, kernel_name("causal_conv1d_bwd_dinit", x.dtype, "any"), [*inputs, dinit, params],
               dinit.numel())
        dinit = dinit.to(initial_states.dtype)
    return dx, dweight, dbias, dinit


def _grads_without_inputs(x, weight, bias, initial_states, dfinal_states):
    """Gradients when B == 0 or T == 0: no output depends on the weights; states pass straight through."""
    dweight = torch.zeros_like(weight)
    dbias = torch.zeros_like(bias) if bias is not None else x.new_empty(0)
    dinit = x.new_empty(0)
    if initial_states is not None:
        dinit = (dfinal_states.to(initial_states.dtype).clone() if dfinal_states is not None and x.shape[2] == 0
                 else torch.zeros_like(initial_states))
    return dweight, dbias, dinit
