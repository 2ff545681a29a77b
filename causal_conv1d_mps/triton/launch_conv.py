"""Launchers of the convolution kernels (allocation, grids, flags) for both op families.

`x` is always described as `[B, T, D]` through three strides, so `causal_conv1d` ((B, D, T) in either
layout) and `short_conv_fused` ((B, T, D), any B/T strides) share every kernel. Absent optional inputs
are passed as `None`, which Triton treats as a compile-time constant: each combination of flags is its
own specialisation, never a placeholder tensor.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _config
from ._launch import launch
from ._loader import is_interpreted, kernels_for


def _search_steps(cu_seqlens: Tensor | None) -> tuple[int, int]:
    """(N, binary-search steps over the N sequence starts); (1, 0) without packing."""
    if cu_seqlens is None:
        return 1, 0
    n = cu_seqlens.shape[0] - 1
    return n, max(n, 1).bit_length()


def launch_forward(x: Tensor, x_strides, out: Tensor, out_strides, B: int, T: int, D: int,
                   weight: Tensor, bias, mask, seq_idx, cu_seqlens, initial_states,
                   activation: int, residual: bool, channel_last: bool) -> None:
    """out[b, t, d] = (x if residual) + act(bias + conv(xe)) for the `[B, T, D]` view given by the strides."""
    if B == 0 or T == 0 or D == 0:
        return
    W = weight.shape[1]
    kernels = kernels_for(x.device)
    cfg = _config.conv_tiles(T, D, W, channel_last, is_interpreted(x.device), x.element_size())
    N, steps = _search_steps(cu_seqlens)
    grid = (_cdiv(T, cfg["BT"]), _cdiv(D, cfg["BD"]), B)
    use_h0 = initial_states is not None and W > 1
    constexprs = dict(W=W, BT=cfg["BT"], BD=cfg["BD"], ACTIVATION=activation, HAS_BIAS=bias is not None,
                      HAS_MASK=mask is not None, HAS_SEQ_IDX=seq_idx is not None, HAS_RESIDUAL=residual,
                      IS_VARLEN=cu_seqlens is not None, USE_INITIAL_STATE=use_h0, EVEN_D=D % cfg["BD"] == 0)
    kernel = kernels.conv_fwd_kernel
    if cfg.get("R"):  # per-thread time runs (kernels/conv_fwd_runs.py); halo rows cover the W-1 taps back
        kernel = kernels.conv_fwd_runs_kernel
        constexprs.update(R=cfg["R"], HR=max(cfg.get("HR", 1), _next_pow2(max(W - 1, 1))), BW=_next_pow2(W))
    launch(kernel, grid,
           (x, weight, bias, mask, seq_idx, cu_seqlens, initial_states if use_h0 else None, out,
            T, D, N, steps, *x_strides, *out_strides),
           constexprs, cfg["num_warps"])


def launch_backward(x: Tensor, x_strides, dout: Tensor, dout_strides, dx: Tensor, dx_strides,
                    B: int, T: int, D: int, weight: Tensor, bias, mask, seq_idx, cu_seqlens, initial_states,
                    dfinal_states, activation: int, residual: bool, channel_last: bool):
    """Fill `dx`; return (dweight, dbias or None without a bias, dinitial_states or None without them)."""
    W = weight.shape[1]
    use_h0 = initial_states is not None and W > 1
    use_dht = dfinal_states is not None and W > 1
    rows = initial_states.shape[0] if initial_states is not None else (
        cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B)
    dh0 = None if initial_states is None else torch.empty_like(initial_states)
    dweight = torch.empty_like(weight)
    dbias = None if bias is None else torch.empty_like(bias)
    if D == 0:
        return dweight, dbias, dh0
    kernels = kernels_for(x.device)
    interpreted = is_interpreted(x.device)
    cfg = _config.conv_bwd_tiles(T, D, W, channel_last, interpreted, x.element_size(),
                                 packed=seq_idx is not None or cu_seqlens is not None, masked=mask is not None)
    N, steps = _search_steps(cu_seqlens)
    # one partial row per stream start: its W-1 states, or the zeros standing in for them, which are still
    # inputs (docs/CONTRACT.md section 7, item 5)
    start_rows = rows if W > 1 and (use_h0 or T > 0) else 0
    BW = _next_pow2(W + 1)
    BH = _next_pow2(max(W - 1, 2))
    flags = dict(ACTIVATION=activation, HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
                 HAS_SEQ_IDX=seq_idx is not None)
    h0 = initial_states if use_h0 else None
    dht = dfinal_states if use_dht else None
    constexprs = dict(W=W, BT=cfg["BT"], BH=BH, BD=cfg["BD"], BW=BW, **flags, HAS_RESIDUAL=residual,
                      IS_VARLEN=cu_seqlens is not None, USE_INITIAL_STATE=use_h0, USE_FINAL_STATE_GRAD=use_dht,
                      EVEN_D=D % cfg["BD"] == 0, TIME_CONTIGUOUS=not channel_last)
    if cfg.get("R") and B > 0:
        # per-thread time runs for the interior (kernels/conv_bwd_runs.py): the programs along T are the
        # interior's chunks of TILES tiles, then one per general tile (the HR steps before the interior and
        # the tail after it); scratch slices only for the general tiles
        HR, HF = cfg["HR"], cfg["HF"]
        n_interior = max((T - HR - HF) // cfg["BT"], 0)
        t_tail = HR + n_interior * cfg["BT"]
        n_general = 1 + _cdiv(max(T - t_tail, 0), cfg["BT"])
        n_runs = _cdiv(n_interior, cfg["TILES"])
        n_chunks = n_runs + n_general
        n_scratch = n_general * _cdiv(D, cfg["BD"]) * B
        kernel, extra_args = kernels.conv_bwd_runs_kernel, (n_interior, n_runs, t_tail)
        constexprs.update(R=cfg["R"], HR=HR, HF=HF, BK=_next_pow2(W), CARRY=bool(cfg.get("CARRY")),
                          VEC=cfg.get("VEC", 8))
    else:
        n_chunks = _cdiv(_cdiv(T, cfg["BT"]), cfg["TILES"]) if B > 0 else 0
        n_scratch = n_chunks * _cdiv(D, cfg["BD"]) * B
        kernel, extra_args = kernels.conv_bwd_kernel, ()
    n_partials = B * n_chunks + start_rows
    dw_partial = torch.empty(n_partials, D, W + 1, device=x.device, dtype=torch.float32)
    if n_chunks > 0:
        grid = (n_chunks, _cdiv(D, cfg["BD"]), B)
        # per-program float32 slices for dpre (tile rows + halo); small enough to live in L2
        scratch = torch.empty(n_scratch, cfg["BT"] + BH, cfg["BD"], device=x.device, dtype=torch.float32)
        launch(kernel, grid,
               (x, weight, bias, mask, seq_idx, cu_seqlens, h0, dout, dht, dx, dw_partial, scratch,
                T, D, N, steps, cfg["TILES"], *extra_args, *x_strides, *dout_strides, *dx_strides),
               constexprs, cfg["num_warps"])
    if start_rows > 0:
        BD = min(_next_pow2(D), 128)
        BJ = _next_pow2(max(W - 1, 2))
        grid = (_cdiv(D, BD), rows)
        # per-program float32 slices for the dpre of a sequence's first W-1 outputs
        scratch = torch.empty(grid[0] * grid[1] * BJ * BD, device=x.device, dtype=torch.float32)
        launch(kernels.conv_bwd_initial_state_kernel, grid,
               (x, weight, bias, mask, seq_idx, cu_seqlens, h0, dout, dht if use_h0 else None,
                dh0 if use_h0 else None, dw_partial, scratch, T, D, B * n_chunks, *x_strides, *dout_strides),
               dict(W=W, BJ=BJ, BC=min(BJ, 16), BD=BD, BW=BW, **flags,
                    IS_VARLEN=cu_seqlens is not None, USE_FINAL_STATE_GRAD=use_dht and use_h0,
                    USE_INITIAL_STATE=use_h0),
               4)
    n_cols = D * (W + 1)
    BC = 256 if not interpreted else min(_next_pow2(n_cols), 1024)
    launch(kernels.reduce_partials_kernel, (_cdiv(n_cols, BC),),
           (dw_partial, dweight, dbias if bias is not None else None, n_partials, n_cols),
           dict(W=W, BP=16, BC=BC, HAS_BIAS=bias is not None), 4)
    return dweight, dbias, dh0


def gather_states(x: Tensor, x_strides, rows: int, T: int, D: int, state_len: int, W: int,
                  mask, initial_states, cu_seqlens) -> Tensor:
    """`[rows, D, state_len]` in x's dtype: the last `state_len` steps of each row's (or sequence's) xe."""
    states = x.new_empty(rows, D, state_len)
    if rows == 0 or D == 0 or state_len == 0:
        return states
    interpreted = is_interpreted(x.device)
    BD = min(_next_pow2(D), 64 if interpreted else 128)
    BS = min(_next_pow2(max(state_len, 2)), 64 if interpreted else 16)
    use_h0 = initial_states is not None and W > 1
    launch(kernels_for(x.device).gather_states_kernel, (_cdiv(D, BD), rows),
           (x, mask, initial_states if use_h0 else None, cu_seqlens, states, T, D, state_len, *x_strides),
           dict(W=W, BD=BD, BS=BS, HAS_MASK=mask is not None, IS_VARLEN=cu_seqlens is not None,
                USE_INITIAL_STATE=use_h0), 4)
    return states


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()
