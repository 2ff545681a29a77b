"""Launcher of the decode-step kernel."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _config
from ._launch import launch
from ._loader import is_interpreted, kernels_for


def launch_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias, cache_seqlens, conv_state_indices,
                  activation: int, residual: bool) -> Tensor:
    """`x` `[B, L, D]` any strides; `conv_state` `[B|N, D, S]` any strides, updated in place."""
    B, L, D = x.shape
    N, _, S = conv_state.shape
    out = torch.empty_like(x)
    if B == 0 or L == 0 or D == 0:
        return out
    device = x.device
    cfg = _config.update_tiles(D, S, is_interpreted(device))
    launch(kernels_for(device).short_conv_update_kernel, (-(-D // cfg["BD"]), B),
           (x, conv_state, weight, bias, cache_seqlens, conv_state_indices, out,
            L, D, S, N, *x.stride(), *out.stride(), *conv_state.stride()),
           dict(W=weight.shape[1], BD=cfg["BD"], BS=cfg["BS"], ACTIVATION=activation, HAS_BIAS=bias is not None,
                # with S == 0 (W == 1) no tap reads the state: skip the modulo by zero of circular mode
                HAS_RESIDUAL=residual, IS_CIRCULAR=cache_seqlens is not None and S > 0,
                HAS_STATE_INDICES=conv_state_indices is not None),
           cfg["num_warps"])
    return out
