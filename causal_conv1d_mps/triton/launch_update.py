"""Launcher of the decode-step kernel."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _config
from ._launch import launch
from ._loader import is_interpreted, kernels_for

# (device, D, S, W, activation, flags) -> (kernel, channel tile BD, constexprs, num_warps): a decode loop
# launches one of these per layer and token, and choosing it costs more host time than looking it up.
# Not used while `_config.OVERRIDES` holds an "update" entry (benchmarks try tiles; `_config.clear()` does not
# reach this table).
_plans: dict[tuple, tuple] = {}
_MAX_PLANS = 1024


def _plan(device: torch.device, D: int, S: int, W: int, activation: int, has_bias: bool, residual: bool,
          circular: bool, has_indices: bool) -> tuple:
    cfg = _config.update_tiles(D, S, is_interpreted(device))
    constexprs = dict(W=W, BD=cfg["BD"], BS=cfg["BS"], ACTIVATION=activation, HAS_BIAS=has_bias,
                      # with S == 0 (W == 1) no tap reads the state: skip the modulo by zero of circular mode
                      HAS_RESIDUAL=residual, IS_CIRCULAR=circular and S > 0, HAS_STATE_INDICES=has_indices)
    return kernels_for(device).short_conv_update_kernel, cfg["BD"], constexprs, cfg["num_warps"]


def launch_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias, cache_seqlens, conv_state_indices,
                  activation: int, residual: bool) -> Tensor:
    """`x` `[B, L, D]` any strides; `conv_state` `[B|N, D, S]` any strides, updated in place."""
    B, L, D = x.shape
    N, _, S = conv_state.shape
    out = torch.empty_like(x)
    if B == 0 or L == 0 or D == 0:
        return out
    key = (x.device, D, S, weight.shape[1], activation, bias is not None, residual, cache_seqlens is not None,
           conv_state_indices is not None)
    overridden = "update" in _config.OVERRIDES  # what `update_tiles` reads of it
    plan = None if overridden else _plans.get(key)
    if plan is None:
        plan = _plan(*key)
        if not overridden:
            if len(_plans) >= _MAX_PLANS:  # keys hold sizes: bound the table for ever-changing shapes
                _plans.clear()
            _plans[key] = plan
    kernel, block_d, constexprs, num_warps = plan
    launch(kernel, (-(-D // block_d), B),
           (x, conv_state, weight, bias, cache_seqlens, conv_state_indices, out,
            L, D, S, N, *x.stride(), *out.stride(), *conv_state.stride()),
           constexprs, num_warps)
    return out
