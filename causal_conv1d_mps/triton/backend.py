"""The six backend functions of docs/BACKENDS.md, mapped onto the launchers.

Both convolution families reach the same kernels with `x` described as `[B, T, D]` by strides:
`causal_conv1d`'s `(B, D, T)` tensor passes `(stride(0), stride(2), stride(1))`.
`causal_conv1d` in the `(B, D, T)` layout without packed sequences or initial states asks the CUDA C++
kernels first (`causal_conv1d_mps.cuda`); they return None where they do not apply. The forward and backward
of `short_conv_fused` and of a channel-last `causal_conv1d` (no packed sequences, no initial states, no
final-state gradient) ask the channel-last CUDA C++ kernels where they were measured faster
(`cuda.launch_btd.preferred`, `preferred_for_backward`). A decode step in shift mode (state slots or not) asks the
CUDA C++ decode kernel first (`cuda.launch_update`).

A forward returns None for final states that were not asked for (docs/BACKENDS.md). Filters wider than
`MAX_WIDTH` go to the reference path's function of the same name, looked up at the call (the self-check
watches that module); each function tests the width itself, where it costs least (no wrapper's frame).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..cuda import launch as cuda_launch
from ..cuda import launch_btd
from ..cuda import launch_update as cuda_update
from . import MAX_WIDTH
from .launch_conv import gather_states, launch_backward, launch_forward
from .launch_update import launch_update


def _btd_strides(t: Tensor) -> tuple[int, int, int]:
    """Strides of a `(B, D, T)` tensor listed as `[B, T, D]`."""
    sb, sd, st = t.stride()  # one call: `stride(i)` costs twice `stride()` each
    return sb, st, sd


def _wide(name: str):
    """The reference path's function `name`, which serves filters wider than `MAX_WIDTH` by design (imported
    only then: the kernels' path never depends on it)."""
    from .. import reference

    return getattr(reference, name)


def causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, activation: int, return_final_states: bool):
    plain = seq_idx is None and initial_states is None
    out = None
    if plain:
        out = cuda_launch.conv_fwd_bdt(x, weight, bias, activation)  # declines W > 17, so no width test first
        if out is not None and not return_final_states:
            return out, None
    W = weight.shape[1]
    if W > MAX_WIDTH:
        return _wide("causal_conv1d_fwd")(x, weight, bias, seq_idx, initial_states, activation, return_final_states)
    B, D, T = x.shape
    strides = _btd_strides(x)
    if out is None:
        channel_last = strides[1] != 1  # T not contiguous
        out = torch.empty_like(x)
        if not (plain and channel_last and launch_btd.preferred(False, W) and launch_btd.conv_fwd_btd(
                x.transpose(1, 2), weight, bias, None, activation, False, out.transpose(1, 2))):
            launch_forward(x, strides, out, _btd_strides(out), B, T, D, weight, bias, None, seq_idx, None,
                           initial_states, activation, False, channel_last)
    if not return_final_states:
        return out, None
    return out, gather_states(x, strides, B, T, D, W - 1, W, None, initial_states, None)


def causal_conv1d_bwd(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, activation: int):
    if weight.shape[1] > MAX_WIDTH:
        return _wide("causal_conv1d_bwd")(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, activation)
    if seq_idx is None and initial_states is None and dfinal_states is None:
        grads = cuda_launch.conv_bwd_bdt(x, weight, bias, dout, activation)
        if grads is not None:
            return grads + (None,)
    B, D, T = x.shape
    dx = torch.empty_like(x)
    strides = _btd_strides(x)
    if (strides[1] != 1 and seq_idx is None and initial_states is None and dfinal_states is None
            and launch_btd.preferred_for_backward(False, weight.shape[1])):
        grads = launch_btd.conv_bwd_btd(x.transpose(1, 2), weight, bias, None, dout.transpose(1, 2), activation,
                                        False, dx.transpose(1, 2))
        if grads is not None:
            return dx, *grads, None
    dweight, dbias, dh0 = launch_backward(
        x, strides, dout, _btd_strides(dout), dx, _btd_strides(dx), B, T, D, weight, bias, None,
        seq_idx, None, initial_states, dfinal_states, activation, False, strides[1] != 1)
    return dx, dweight, dbias, dh0


def _float_mask(mask):
    """The mask as the Triton kernels read it (float32): the api hands the CUDA C++ kernels' own dtypes on
    (`_validate.mask_dtype`), converted here only where those kernels do not serve the call."""
    return mask if mask is None or mask.dtype == torch.float32 else mask.to(torch.float32)


def short_conv_fused_fwd(x, weight, bias, mask, initial_states, cu_seqlens,
                         activation: int, residual: bool, return_final_states: bool):
    if weight.shape[1] > MAX_WIDTH:
        return _wide("short_conv_fused_fwd")(x, weight, bias, mask, initial_states, cu_seqlens, activation,
                                             residual, return_final_states)
    B, T, D = x.shape
    out = x.new_empty(B, T, D)
    if not (cu_seqlens is None and initial_states is None and launch_btd.preferred(mask is not None, weight.shape[1])
            and launch_btd.conv_fwd_btd(x, weight, bias, mask, activation, residual, out)):
        mask = _float_mask(mask)  # once: the final states below read it too
        launch_forward(x, x.stride(), out, out.stride(), B, T, D, weight, bias, mask, None, cu_seqlens,
                       initial_states, activation, residual, True)
    if not return_final_states:
        return out, None
    W = weight.shape[1]
    rows = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return out, gather_states(x, x.stride(), rows, T, D, W - 1, W, _float_mask(mask), initial_states,
                              cu_seqlens)


def short_conv_fused_bwd(x, weight, bias, mask, initial_states, cu_seqlens, dout, dfinal_states,
                         activation: int, residual: bool):
    if weight.shape[1] > MAX_WIDTH:
        return _wide("short_conv_fused_bwd")(x, weight, bias, mask, initial_states, cu_seqlens, dout,
                                             dfinal_states, activation, residual)
    B, T, D = x.shape
    dx = x.new_empty(B, T, D)
    if (cu_seqlens is None and initial_states is None and dfinal_states is None
            and launch_btd.preferred_for_backward(mask is not None, weight.shape[1])):
        grads = launch_btd.conv_bwd_btd(x, weight, bias, mask, dout, activation, residual, dx)
        if grads is not None:
            return dx, *grads, None
    dweight, dbias, dh0 = launch_backward(
        x, x.stride(), dout, dout.stride(), dx, dx.stride(), B, T, D, weight, bias, _float_mask(mask), None,
        cu_seqlens, initial_states, dfinal_states, activation, residual, True)
    return dx, dweight, dbias, dh0


def short_conv_update(x, conv_state, weight, bias, cache_seqlens, conv_state_indices,
                      activation: int, residual: bool) -> Tensor:
    if weight.shape[1] > MAX_WIDTH:
        return _wide("short_conv_update")(x, conv_state, weight, bias, cache_seqlens, conv_state_indices,
                                          activation, residual)
    if cache_seqlens is None:
        out = cuda_update.conv_update(x, conv_state, weight, bias, activation, residual, conv_state_indices)
        if out is not None:
            return out
    return launch_update(x, conv_state, weight, bias, cache_seqlens, conv_state_indices, activation, residual)


def causal_conv1d_varlen_states(x, cu_seqlens, state_len: int) -> Tensor:
    total, D = x.shape
    return gather_states(x, (0, x.stride(0), x.stride(1)), cu_seqlens.shape[0] - 1, total, D, state_len, 1,
                         None, None, cu_seqlens)
