"""Backward kernels shared by `causal_conv1d` and `short_conv_fused`.

`conv_bwd_kernel` tiles the time axis. For the rows `s` of a tile, the outputs reading `x[s]` through
tap k sit at `t = s + (W-1) - k`, so
    dxe[s]      = sum_k weight[k] * dpre[t_k]            (a gather: no atomics, no second pass)
    dweight[k] += sum_s dpre[t_k] * xe[s]
    dbias      += sum_s dpre[s]                          (the k = W-1 term)
where `dpre = dout * act'(pre)` (`activation_grad`; the identity skips it) recomputes the pre-activation
from `x` (nothing saved from the forward).
Each program first computes dpre once per row (its BT rows and the W-1 rows after them), parks it in
its own slice of an L2-resident float32 scratch, and after a barrier reads it back shifted by each tap:
Triton has no register shift, and recomputing dpre for every tap would cost W times the arithmetic.
A tile whose taps, halo and channels all lie inside `x` (no packed sequences) takes an unmasked path
(`bwd_tile_interior`); every other tile takes the masked one (`bwd_tile_general`, which the run-based
backward `conv_bwd_runs` uses for its boundary tiles too). The scratch is laid out like `x` (time-major
when T is contiguous) and 16-bit channel-last tiles are read 4 channels per access, so that no tile
changes layout between memory and arithmetic (docs/PERF_NOTES.md, v4). A program walks
`tiles_per_program` T tiles of one (D tile, row) and keeps its weight/bias gradient in registers; each
program writes one float32 partial row, and `reduce_partials_kernel` sums the rows in a fixed order
(bitwise deterministic, no float atomics).

The W-1 steps before a stream start (the initial states, or the zeros standing in for them) have no row
in that grid: a small kernel, `conv_bwd_initial_state_kernel`, gives their gradient and their share of
dweight (one partial row each). It runs without initial states too: those zeros are still inputs, so a
NaN/Inf dpre among a stream's first W-1 outputs makes the dweight of the taps reaching before the start
NaN (`dpre * 0`), as in the reference (docs/CONTRACT.md section 7, item 5).
"""
import triton
import triton.language as tl

from .common import (IDENTITY, UNROLL_MAX_W, activation_grad, add, conv_pre, conv_pre_interior, load_source,
                     masked_input, row_sequences, stream_bounds)


@triton.jit
def dpre_rows(x, weight, bias, mask, seq_idx, cu_seqlens, h0, dout, i_b, o_t, o_d, m_t, m_d, T, D, N,
              n_search_steps, stride_x_b, stride_x_t, stride_x_d, stride_do_b, stride_do_t, stride_do_d,
              W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
              ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
              HAS_SEQ_IDX: tl.constexpr, IS_VARLEN: tl.constexpr, USE_INITIAL_STATE: tl.constexpr):
    """Gradient at the pre-activation of output rows `o_t` (float32, zero outside the outputs)."""
    i_h, bos, eos, b_seq_t, ok_h = row_sequences(seq_idx, cu_seqlens, i_b, o_t, m_t, T, N, n_search_steps,
                                                 HAS_SEQ_IDX, IS_VARLEN)
    if HAS_SEQ_IDX:
        ok_t = m_t & (b_seq_t >= 0)  # padding outputs are constant zeros
    else:
        ok_t = m_t
    p_do = (dout + i_b.to(tl.int64) * stride_do_b + o_t.to(tl.int64)[:, None] * stride_do_t
            + o_d.to(tl.int64)[None, :] * stride_do_d)
    b_dpre = tl.load(p_do, mask=ok_t[:, None] & m_d[None, :], other=0.).to(tl.float32)
    if ACTIVATION != IDENTITY:
        b_pre = conv_pre(x, weight, bias, mask, seq_idx, h0, i_b, i_h, o_t, o_d, ok_t, m_d, bos, b_seq_t, ok_h,
                         T, D, stride_x_b, stride_x_t, stride_x_d, W, BT, BD,
                         HAS_BIAS, HAS_MASK, HAS_SEQ_IDX, USE_INITIAL_STATE)
        b_dpre = b_dpre * activation_grad(b_pre, ACTIVATION)
    return b_dpre


@triton.jit
def tap_gradients(b_g, b_w, b_xs, b_dxe, b_dw, o_w, k, W: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Tap k's share: `dxe += dpre[t_k] * w[k]`, and into row k of the [BW, BD] weight-gradient tile the sum
    over the tile of `dpre[t_k] * xe[s]` (row W: the bias gradient, from the last tap)."""
    b_dxe += b_g * b_w[None, :]
    b_dw += tl.where(o_w[:, None] == k, tl.reduce(b_g * b_xs, 0, add)[None, :], 0.)
    if HAS_BIAS:
        if k == W - 1:
            b_dw += tl.where(o_w[:, None] == W, tl.reduce(b_g, 0, add)[None, :], 0.)
    return b_dxe, b_dw


@triton.jit
def general_tap_gradients(weight, p_scr, p_seq, b_xs, b_dxe, b_dw, b_seq_s, o_s, o_r, o_d, o_w, m_s, m_d, eos, k,
                          W: tl.constexpr, SCR_R: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ_IDX: tl.constexpr):
    """`tap_gradients` of tap `k` on a general tile: only the outputs of each source row's own sequence
    count (`k` a constant when unrolled, a loop counter past UNROLL_MAX_W)."""
    o_tk = o_s + (W - 1 - k)
    ok_t = m_s & (o_tk < eos)  # the output reading s through tap k is of the same sequence
    if HAS_SEQ_IDX:
        b_seq_tk = tl.load(p_seq + o_tk, mask=ok_t, other=-1)
        ok_t = ok_t & (b_seq_tk == b_seq_s) & (b_seq_s >= 0)
    b_g = tl.load(p_scr + (o_r + (W - 1 - k))[:, None] * SCR_R, mask=ok_t[:, None], other=0.)
    b_w = tl.load(weight + o_d * W + k, mask=m_d, other=0.).to(tl.float32)
    # a source outside the output's sequence adds nothing to dweight, even if it is NaN
    b_xs_k = tl.where(ok_t[:, None], b_xs, 0.)
    return tap_gradients(b_g, b_w, b_xs_k, b_dxe, b_dw, o_w, k, W, HAS_BIAS)


@triton.jit
def bwd_tile_interior(x, weight, bias, mask, dout, dx, p_scr, b_dw, i_b, t0, o_r, o_rh, o_d, o_w, T,
                      stride_x_b, stride_x_t, stride_x_d, stride_do_b, stride_do_t, stride_do_d,
                      stride_dx_b, stride_dx_t, stride_dx_d,
                      W: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, SCR_R: tl.constexpr,
                      ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                      HAS_RESIDUAL: tl.constexpr):
    """One T tile whose taps, halo rows and channels all lie inside `x` (no sequence boundary): the
    same two phases as the general path, without masks, and with `dout` loaded once for dpre and the
    residual. Returns the updated weight/bias gradient tile."""
    o_s = t0 + o_r
    p_do = dout + i_b.to(tl.int64) * stride_do_b + o_d.to(tl.int64)[None, :] * stride_do_d
    b_do = tl.load(p_do + o_s.to(tl.int64)[:, None] * stride_do_t).to(tl.float32)
    b_dpre = b_do
    # halo rows past the first W-1 are never read back: clamped, they stay inside x
    o_th = tl.minimum(t0 + BT + o_rh, T - 1)
    b_dpre_h = tl.load(p_do + o_th.to(tl.int64)[:, None] * stride_do_t).to(tl.float32)
    if ACTIVATION != IDENTITY:
        b_pre = conv_pre_interior(x, weight, bias, mask, i_b, o_s, o_d, T, stride_x_b, stride_x_t, stride_x_d,
                                  W, BT, BD, HAS_BIAS, HAS_MASK)
        b_pre_h = conv_pre_interior(x, weight, bias, mask, i_b, o_th, o_d, T, stride_x_b, stride_x_t, stride_x_d,
                                    W, BH, BD, HAS_BIAS, HAS_MASK)
        b_dpre = b_dpre * activation_grad(b_pre, ACTIVATION)
        b_dpre_h = b_dpre_h * activation_grad(b_pre_h, ACTIVATION)
    tl.debug_barrier()  # the previous tile's readers are done with the scratch
    tl.store(p_scr + o_r[:, None] * SCR_R, b_dpre)
    tl.store(p_scr + (BT + o_rh)[:, None] * SCR_R, b_dpre_h)
    tl.debug_barrier()  # make the rows visible to every thread of the program

    p_x = (x + i_b.to(tl.int64) * stride_x_b + o_s.to(tl.int64)[:, None] * stride_x_t
           + o_d.to(tl.int64)[None, :] * stride_x_d)
    b_xs = tl.load(p_x).to(tl.float32)
    if HAS_MASK:
        b_m = tl.load(mask + i_b.to(tl.int64) * T + o_s).to(tl.float32)
        b_xs = masked_input(b_xs, b_m[:, None])
    b_dxe = tl.full([BT, BD], 0., tl.float32)
    for k in tl.static_range(W):
        b_g = tl.load(p_scr + (o_r + (W - 1 - k))[:, None] * SCR_R)
        b_w = tl.load(weight + o_d * W + k).to(tl.float32)
        b_dxe, b_dw = tap_gradients(b_g, b_w, b_xs, b_dxe, b_dw, o_w, k, W, HAS_BIAS)
    if HAS_MASK:
        b_dxe = masked_input(b_dxe, b_m[:, None])
    if HAS_RESIDUAL:
        b_dxe += b_do
    p_dx = (dx + i_b.to(tl.int64) * stride_dx_b + o_s.to(tl.int64)[:, None] * stride_dx_t
            + o_d.to(tl.int64)[None, :] * stride_dx_d)
    tl.store(p_dx, b_dxe.to(dx.dtype.element_ty))
    return b_dw


@triton.jit
def bwd_tile_general(x, weight, bias, mask, seq_idx, cu_seqlens, h0, dout, dht, dx, p_scr, b_dw, i_b,
                     t_start, t_stop, o_r, o_rh, o_d, o_w, T, D, N, n_search_steps,
                     stride_x_b, stride_x_t, stride_x_d, stride_do_b, stride_do_t, stride_do_d,
                     stride_dx_b, stride_dx_t, stride_dx_d,
                     W: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, SCR_R: tl.constexpr,
                     ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                     HAS_SEQ_IDX: tl.constexpr, HAS_RESIDUAL: tl.constexpr, IS_VARLEN: tl.constexpr,
                     USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRAD: tl.constexpr,
                     SCRATCH_REUSED: tl.constexpr):
    """One T tile with every mask (sequence boundaries, padding, initial states, final-state gradients,
    partial tiles): source rows `t_start .. min(t_start + BT, t_stop, T) - 1` get their dx, and their share
    of the `[BW, BD]` weight/bias gradient `b_dw` (row W: bias) is added; the updated `b_dw` is returned.

    Phase 1 parks the dpre of the BT rows from `t_start` and of the W-1 rows after them in the program's
    scratch slice `p_scr`; phase 2 gathers it through each tap. Rows from `t_stop` on get dpre (a tap of an
    earlier row reads it) but no dx and no dweight share: another tile owns them (`conv_bwd_runs`; pass
    `t_stop = T` for a whole tile). `SCRATCH_REUSED`: an earlier tile of this program may still be reading
    the scratch, so wait for it before overwriting.
    """
    m_d = o_d < D
    o_s = t_start + o_r
    m_all = o_s < T
    m_s = m_all & (o_s < t_stop)
    # phase 1: dpre once per output row (tile rows and the W-1 halo rows after them) into the scratch
    b_dpre = dpre_rows(x, weight, bias, mask, seq_idx, cu_seqlens, h0, dout, i_b, o_s, o_d, m_all, m_d,
                       T, D, N, n_search_steps, stride_x_b, stride_x_t, stride_x_d,
                       stride_do_b, stride_do_t, stride_do_d, W, BT, BD,
                       ACTIVATION, HAS_BIAS, HAS_MASK, HAS_SEQ_IDX, IS_VARLEN, USE_INITIAL_STATE)
    o_th = t_start + BT + o_rh
    m_th = (o_th < T) & (o_rh < W - 1)
    b_dpre_h = dpre_rows(x, weight, bias, mask, seq_idx, cu_seqlens, h0, dout, i_b, o_th, o_d, m_th, m_d,
                         T, D, N, n_search_steps, stride_x_b, stride_x_t, stride_x_d,
                         stride_do_b, stride_do_t, stride_do_d, W, BH, BD,
                         ACTIVATION, HAS_BIAS, HAS_MASK, HAS_SEQ_IDX, IS_VARLEN, USE_INITIAL_STATE)
    if SCRATCH_REUSED:
        tl.debug_barrier()  # the previous tile's readers are done with the scratch
    tl.store(p_scr + o_r[:, None] * SCR_R, b_dpre)
    tl.store(p_scr + (BT + o_rh)[:, None] * SCR_R, b_dpre_h)
    tl.debug_barrier()  # make the rows visible to every thread of the program

    # phase 2: gather dpre through each tap for the source rows s of the tile
    i_h, bos, eos, b_seq_s, _ = row_sequences(seq_idx, cu_seqlens, i_b, o_s, m_s, T, N, n_search_steps,
                                              HAS_SEQ_IDX, IS_VARLEN)
    if HAS_SEQ_IDX:
        p_seq = seq_idx + i_b.to(tl.int64) * T
    else:
        p_seq = seq_idx  # never read
    b_xs = load_source(x, mask, h0, i_b, i_h, o_s, o_d, m_d, m_s, m_s, bos, T, D,
                       stride_x_b, stride_x_t, stride_x_d, W, HAS_MASK, False)
    b_dxe = tl.full([BT, BD], 0., tl.float32)
    if W <= UNROLL_MAX_W:
        for k in tl.static_range(W):
            b_dxe, b_dw = general_tap_gradients(weight, p_scr, p_seq, b_xs, b_dxe, b_dw, b_seq_s, o_s, o_r, o_d,
                                                o_w, m_s, m_d, eos, k, W, SCR_R, HAS_BIAS, HAS_SEQ_IDX)
    else:
        for k in range(W):
            b_dxe, b_dw = general_tap_gradients(weight, p_scr, p_seq, b_xs, b_dxe, b_dw, b_seq_s, o_s, o_r, o_d,
                                                o_w, m_s, m_d, eos, k, W, SCR_R, HAS_BIAS, HAS_SEQ_IDX)

    if USE_FINAL_STATE_GRAD:
        # the final states are the last W-1 steps of xe: their gradient lands on those steps
        o_j = o_s - (eos - (W - 1))
        m_j = m_s & (o_j >= 0) & (o_j < W - 1)
        p_dht = dht + (i_h.to(tl.int64) * D * (W - 1) + o_j)[:, None] + o_d[None, :] * (W - 1)
        b_dxe += tl.load(p_dht, mask=m_j[:, None] & m_d[None, :], other=0.).to(tl.float32)
    if HAS_MASK:
        b_dxe = masked_input(b_dxe, tl.load(mask + i_b.to(tl.int64) * T + o_s, mask=m_s,
                                            other=0.).to(tl.float32)[:, None])
    m_sd = m_s[:, None] & m_d[None, :]
    if HAS_RESIDUAL:
        p_do = dout + i_b.to(tl.int64) * stride_do_b + o_d.to(tl.int64)[None, :] * stride_do_d
        b_dxe += tl.load(p_do + o_s.to(tl.int64)[:, None] * stride_do_t, mask=m_sd, other=0.).to(tl.float32)
    p_dx = dx + i_b.to(tl.int64) * stride_dx_b + o_d.to(tl.int64)[None, :] * stride_dx_d
    tl.store(p_dx + o_s.to(tl.int64)[:, None] * stride_dx_t, b_dxe.to(dx.dtype.element_ty), mask=m_sd)
    return b_dw


@triton.jit
def conv_bwd_kernel(
    x, weight, bias, mask, seq_idx, cu_seqlens, h0, dout, dht, dx, dw_partial, scratch,
    T, D, N, n_search_steps, tiles_per_program,
    stride_x_b, stride_x_t, stride_x_d,
    stride_do_b, stride_do_t, stride_do_d,
    stride_dx_b, stride_dx_t, stride_dx_d,
    W: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, HAS_RESIDUAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRAD: tl.constexpr, EVEN_D: tl.constexpr,
    TIME_CONTIGUOUS: tl.constexpr,
):
    i_c, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # at most 4 contiguous channels per access: 16-bit inputs then share the float32 scratch's layout
    # (4 per thread), instead of converting every tile between 8-wide and 4-wide layouts with shuffles
    o_d = tl.max_contiguous(i_d * BD + tl.arange(0, BD), 4)
    m_d = o_d < D
    o_w = tl.arange(0, BW)
    o_r = tl.arange(0, BT)
    o_rh = tl.arange(0, BH)
    # this program's slice of the scratch: dpre of the tile rows, then of the W-1 rows after them
    i_p = i_b * tl.num_programs(0) + i_c
    # it is laid out like x (time-major when T is contiguous), so tiles move to and from it without
    # a layout conversion
    if TIME_CONTIGUOUS:
        SCR_R: tl.constexpr = 1
        SCR_D: tl.constexpr = BT + BH
    else:
        SCR_R: tl.constexpr = BD
        SCR_D: tl.constexpr = 1
    p_scr = (scratch + ((i_p * tl.num_programs(1) + i_d).to(tl.int64) * (BT + BH)) * BD
             + tl.arange(0, BD)[None, :] * SCR_D)
    # row W carries the bias gradient. [BW, BD] (not [BD, BW]): a per-tap sum over T, broadcast back
    # along a new leading axis, keeps the tile's own layout, so accumulating needs no layout conversion
    b_dw = tl.full([BW, BD], 0., tl.float32)

    i_t_end = tl.minimum((i_c + 1) * tiles_per_program, (T + BT - 1) // BT)
    for i_t in range(i_c * tiles_per_program, i_t_end):
        if EVEN_D and not HAS_SEQ_IDX and not IS_VARLEN:
            is_interior = (i_t * BT >= W - 1) & (i_t * BT + BT + W - 1 <= T)
        else:
            is_interior = i_t < 0
        if is_interior:
            b_dw = bwd_tile_interior(x, weight, bias, mask, dout, dx, p_scr, b_dw, i_b, i_t * BT, o_r, o_rh, o_d, o_w,
                                     T, stride_x_b, stride_x_t, stride_x_d, stride_do_b, stride_do_t, stride_do_d,
                                     stride_dx_b, stride_dx_t, stride_dx_d, W, BT, BH, BD, SCR_R,
                                     ACTIVATION, HAS_BIAS, HAS_MASK, HAS_RESIDUAL)
        else:
            b_dw = bwd_tile_general(x, weight, bias, mask, seq_idx, cu_seqlens, h0, dout, dht, dx, p_scr, b_dw, i_b,
                                    i_t * BT, T, o_r, o_rh, o_d, o_w, T, D, N, n_search_steps,
                                    stride_x_b, stride_x_t, stride_x_d, stride_do_b, stride_do_t, stride_do_d,
                                    stride_dx_b, stride_dx_t, stride_dx_d, W, BT, BH, BD, SCR_R,
                                    ACTIVATION, HAS_BIAS, HAS_MASK, HAS_SEQ_IDX, HAS_RESIDUAL, IS_VARLEN,
                                    USE_INITIAL_STATE, USE_FINAL_STATE_GRAD, True)

    p_dw = dw_partial + (i_p.to(tl.int64) * D + o_d[None, :]) * (W + 1) + o_w[:, None]
    tl.store(p_dw, b_dw, mask=m_d[None, :] & (o_w[:, None] < W + 1))


@triton.jit
def conv_bwd_initial_state_kernel(
    x, weight, bias, mask, seq_idx, cu_seqlens, h0, dout, dht, dh0, dw_partial, scratch,
    T, D, partial_offset,
    stride_x_b, stride_x_t, stride_x_d,
    stride_do_b, stride_do_t, stride_do_d,
    W: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, IS_VARLEN: tl.constexpr, USE_FINAL_STATE_GRAD: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
):
    """Gradient of the initial states of one row/sequence (the W-1 source steps before `bos`) and their
    share of dweight.

    Only the first W-1 outputs of the sequence read them. Their dpre is computed once (one pass of W
    taps per chunk of BC outputs that exist), parked in this program's scratch slice `[BJ, BD]`, and read
    back shifted by each tap: state column j is read by output `bos + j - k` through tap k. The work grows
    with W times the outputs that exist, not with W**2 (W = 257 with T = 6 took minutes before).

    Without initial states (`USE_INITIAL_STATE` false: `h0`, `dh0` and `dht` are None) those steps are
    zeros that are still inputs: nothing is loaded or stored but the partial row, whose tap k holds
    `sum dpre * 0` over the outputs reading a zero through it: 0, or NaN where one of those dpre is NaN
    or +-Inf (docs/CONTRACT.md section 7, item 5).
    """
    i_d, i_r = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_w = tl.arange(0, BW)
    i_b, bos, eos = stream_bounds(cu_seqlens, i_r, T, IS_VARLEN)
    o_j = tl.arange(0, BJ)
    m_j = o_j < W - 1
    # phase 1: dpre of the outputs t = bos + j, j < W-1, of this sequence, BC rows at a time; chunks past
    # the end of the sequence hold zeros and skip the taps (a short sequence with a wide filter is cheap)
    if HAS_SEQ_IDX:
        p_seq = seq_idx + i_b.to(tl.int64) * T
        # the states belong to the sequence at position 0 of the row (none when T == 0)
        b_seq_h = tl.load(p_seq + o_j * 0, mask=(o_j * 0 + T) > 0, other=-1)
    else:
        b_seq_h = o_j
        b_seq_hc = tl.arange(0, BC)
    p_do = dout + i_b.to(tl.int64) * stride_do_b + o_d.to(tl.int64)[None, :] * stride_do_d
    p_scr = scratch + (i_r.to(tl.int64) * tl.num_programs(0) + i_d) * BJ * BD + tl.arange(0, BD)[None, :]
    o_c = tl.arange(0, BC)
    for j0 in range(0, BJ, BC):
        o_t = bos + j0 + o_c
        ok_t = (j0 + o_c < W - 1) & (o_t < eos) & (o_t >= 0) & (o_t < T)  # in x even for a bad cu_seqlens
        if HAS_SEQ_IDX:
            b_seq_hc = tl.load(p_seq + o_c * 0, mask=(o_c * 0 + T) > 0, other=-1)
            b_seq_t = tl.load(p_seq + o_t, mask=ok_t, other=-2)
            ok_t = ok_t & (b_seq_t == b_seq_hc) & (b_seq_hc >= 0)
        b_dpre = tl.load(p_do + o_t.to(tl.int64)[:, None] * stride_do_t, mask=ok_t[:, None] & m_d[None, :],
                         other=0.).to(tl.float32)
        if ACTIVATION != IDENTITY:
            if bos + j0 < eos:
                b_pre = conv_pre(x, weight, bias, mask, seq_idx, h0, i_b, o_c * 0 + i_r, o_t, o_d, ok_t, m_d, bos,
                                 b_seq_hc, ok_t, T, D, stride_x_b, stride_x_t, stride_x_d, W, BC, BD,
                                 HAS_BIAS, HAS_MASK, HAS_SEQ_IDX, USE_INITIAL_STATE)
                b_dpre = b_dpre * activation_grad(b_pre, ACTIVATION)
        tl.store(p_scr + (j0 + o_c)[:, None] * BD, b_dpre)
    tl.debug_barrier()  # make the rows visible to every thread of the program

    # phase 2: each tap reads the parked rows shifted by k
    m_jd = m_j[:, None] & m_d[None, :]
    if USE_INITIAL_STATE:
        p_h = h0 + i_r.to(tl.int64) * D * (W - 1) + o_d[None, :] * (W - 1) + o_j[:, None]
        b_h = tl.load(p_h, mask=m_jd, other=0.).to(tl.float32)
        b_dh = tl.full([BJ, BD], 0., tl.float32)
    b_dw = tl.full([BD, BW], 0., tl.float32)
    # a run-time loop: the body is small and W may be large
    for k in range(W):
        o_src = o_j - k
        o_tk = bos + o_src
        ok_k = m_j & (o_src >= 0) & (o_tk < eos) & (o_tk >= 0) & (o_tk < T)
        if HAS_SEQ_IDX:
            b_seq_tk = tl.load(p_seq + o_tk, mask=ok_k, other=-2)
            ok_k = ok_k & (b_seq_tk == b_seq_h) & (b_seq_h >= 0)
        b_g = tl.load(p_scr + o_src[:, None] * BD, mask=ok_k[:, None], other=0.)
        if USE_INITIAL_STATE:
            b_w = tl.load(weight + o_d * W + k, mask=m_d, other=0.).to(tl.float32)
            b_dh += b_g * b_w[None, :]
            b_gh = b_g * b_h
        else:
            # `dpre * 0` by selection, which no compiler may fold away: NaN exactly where dpre is not finite
            b_gh = tl.where(tl.abs(b_g) < float("inf"), 0., float("nan"))
        # a state read by no output of its sequence adds nothing to dweight, even if it is NaN
        b_gh = tl.where(ok_k[:, None], b_gh, 0.)
        b_dw += tl.where(o_w[None, :] == k, tl.reduce(b_gh, 0, add)[:, None], 0.)

    if USE_INITIAL_STATE:
        if USE_FINAL_STATE_GRAD:
            # a sequence shorter than W-1 passes part of its initial state straight to its final state
            o_s = bos - (W - 1) + o_j
            o_f = o_s - (eos - (W - 1))
            m_f = m_j & (o_f >= 0) & (o_f < W - 1)
            p_dht = dht + i_r.to(tl.int64) * D * (W - 1) + o_d[None, :] * (W - 1) + o_f[:, None]
            b_dh += tl.load(p_dht, mask=m_f[:, None] & m_d[None, :], other=0.).to(tl.float32)
        tl.store(dh0 + i_r.to(tl.int64) * D * (W - 1) + o_d[None, :] * (W - 1) + o_j[:, None],
                 b_dh.to(dh0.dtype.element_ty), mask=m_jd)
    i_p = partial_offset + i_r
    p_dw = dw_partial + (i_p.to(tl.int64) * D + o_d[:, None]) * (W + 1) + o_w[None, :]
    tl.store(p_dw, b_dw, mask=m_d[:, None] & (o_w[None, :] < W + 1))


@triton.jit
def reduce_partials_kernel(dw_partial, dw, db, P, n_cols,
                           W: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Sum the `P` partial rows `[P, D*(W+1)]` in a fixed order and cast once to the parameters' dtypes."""
    i_c = tl.program_id(0)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < n_cols
    b_acc = tl.full([BC], 0., tl.float32)
    for p0 in range(0, P, BP):
        o_p = p0 + tl.arange(0, BP)
        p_part = dw_partial + o_p.to(tl.int64)[:, None] * n_cols + o_c[None, :]
        b_acc += tl.reduce(tl.load(p_part, mask=(o_p < P)[:, None] & m_c[None, :], other=0.), 0, add)
    o_dd = o_c // (W + 1)
    o_k = o_c % (W + 1)
    tl.store(dw + o_dd * W + o_k, b_acc.to(dw.dtype.element_ty), mask=m_c & (o_k < W))
    if HAS_BIAS:
        tl.store(db + o_dd, b_acc.to(db.dtype.element_ty), mask=m_c & (o_k == W))
