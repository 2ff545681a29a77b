"""Backward kernel with per-thread time runs (v6): the taps of dx, dweight and dbias are formed in
registers, and the weight/bias gradient is summed across threads once per program.

Same inputs and semantics as `conv_bwd.conv_bwd_kernel`; the launcher picks one or the other per shape
(`.._config.conv_bwd_tiles`, docs/PERF_NOTES.md v6).

Interior tiles are `[R, G, BD]` as in `conv_fwd_runs`: G runs of R consecutive time steps whose R axis
lies inside each thread, so a compile-time slot of it is a register (`_pick`). For one run starting at
step t, with `dpre = dout * act'(pre)`:
    dpre rows t .. t+R+W-2   the run and the W-1 rows after it; the pre-activation of those rows is
                             recomputed from x (the run, HR rows before it and HF rows after it: the
                             halo loads hit L1, the neighbouring run was loaded by the same program)
    dx[s]      = sum_k w[k] * dpre[s + W-1-k]                     for the R rows s of the run
    dweight[k] += sum_s dpre[s + W-1-k] * xe[s]                   for the R rows s of the run
    dbias      += sum_s dpre[s]
dweight and dbias are summed over the in-thread R axis only, into `[BK, G, BD]` / `[G, BD]` accumulators
that live across all the tiles a program walks; the sum across threads (over G) happens once, when the
program writes its float32 partial row. There is no scratch and no barrier on that path. Both sums are
taken by source row, as the general tiles take them, so each (output, source) pair is counted once.

With `CARRY` (one run per tile, G = 1: each thread walks its own channels) a program walks its tiles back
in time and each tile hands the dpre of its first HF rows to the tile before it, so only the program's
first tile recomputes the W-1 rows after its run (at W = 4 and R = 4 that recomputation was 3 of every
7 pre-activations). `VEC` caps the channels per access (`tl.max_contiguous`): 4 bf16 channels per thread
in channel-last keep one warp on 128 channels with the R axis inside each thread.

The interior runs start at step HR (so that every halo load stays inside x); the HR steps before them and
the tail after the last full interior tile (at least HF steps: the forward halo must stay inside x) are
cut into `general` tiles, one per program, which run `conv_bwd.bwd_tile_general` (the masked scratch path
of `conv_bwd_kernel`) and so handle initial states, final-state gradients, masks and partial tiles the same
way. Packed sequences and
partial D tiles are not dispatched here (they stay on `conv_bwd_kernel`).

Every program writes one partial row; `reduce_partials_kernel` sums them in a fixed order (bitwise
deterministic, no float atomics), after `conv_bwd_initial_state_kernel` for the initial states.
"""
import triton
import triton.language as tl

from .common import IDENTITY, _interpreting, activation_grad, add, masked_input
from .conv_bwd import bwd_tile_general
from .conv_fwd_runs import _or

# `_pick`'s combine: compiled, a bitwise OR (LLVM folds `x | 0`, nothing is left but the register, as in
# conv_fwd_runs); interpreted, Triton's own sum combine, which the interpreter runs as one numpy sum instead
# of a Python call per element (a sum of one value and zeros is that value, bit for bit)
_pick_combine = add if _interpreting() else _or


@triton.jit
def _pick(tile, o_r, slot: tl.constexpr):
    """Slot `slot` of the in-thread axis 0 of a float32 `[S, G, BD]` tile, as `[G, BD]`."""
    bits = tile.to(tl.int32, bitcast=True)
    return tl.reduce(tl.where(o_r == slot, bits, 0), 0, _pick_combine).to(tl.float32, bitcast=True)


@triton.jit
def _source(b_h, b_x, b_f, o_j, o_r, o_f, i: tl.constexpr, R: tl.constexpr, HR: tl.constexpr):
    """The `[G, BD]` value at step `i` of each run (negative: the halo before it; `>= R`: the halo after)."""
    if i < 0:
        return _pick(b_h, o_j, HR + i)
    elif i < R:
        return _pick(b_x, o_r, i)
    else:
        return _pick(b_f, o_f, i - R)


@triton.jit
def _bwd_runs_tile(x, mask, dout, dx, b_w, b_bias, b_dw, b_db, b_carry, i_b, t0, o_d, T,
                   stride_x_b, stride_x_t, stride_x_d, stride_do_b, stride_do_t, stride_do_d,
                   stride_dx_b, stride_dx_t, stride_dx_d,
                   W: tl.constexpr, R: tl.constexpr, G: tl.constexpr, HR: tl.constexpr, HF: tl.constexpr,
                   BK: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                   HAS_RESIDUAL: tl.constexpr, FROM_CARRY: tl.constexpr):
    """dx of the interior rows `t0 .. t0 + G*R - 1`; returns the updated accumulators and the dpre of the
    first HF rows of each run, `(b_dw, b_db, b_carry)`.

    With `FROM_CARRY` the dpre of the HF rows after each run is `b_carry` (what the tile after this one
    returned: G must be 1 and HF <= R); otherwise it is recomputed from x and dout.
    """
    o_r = tl.arange(0, R)[:, None, None]
    o_j = tl.arange(0, HR)[:, None, None]
    o_f = tl.arange(0, HF)[:, None, None]
    o_k = tl.arange(0, BK)[:, None, None]
    o_c = o_d[None, None, :]
    t_run = t0 + tl.arange(0, G)[None, :, None] * R
    p_x = x + i_b.to(tl.int64) * stride_x_b + o_c.to(tl.int64) * stride_x_d
    p_do = dout + i_b.to(tl.int64) * stride_do_b + o_c.to(tl.int64) * stride_do_d
    b_x = tl.load(p_x + (t_run + o_r).to(tl.int64) * stride_x_t).to(tl.float32)
    b_do = tl.load(p_do + (t_run + o_r).to(tl.int64) * stride_do_t).to(tl.float32)
    if ACTIVATION != IDENTITY:
        b_h = tl.load(p_x + (t_run - HR + o_j).to(tl.int64) * stride_x_t).to(tl.float32)
    else:
        b_h = b_x  # never read: no pre-activation to recompute
    if FROM_CARRY:
        b_f = b_h  # never read
        b_gf = b_carry
    else:
        b_f = tl.load(p_x + (t_run + R + o_f).to(tl.int64) * stride_x_t).to(tl.float32)
        b_gf = tl.load(p_do + (t_run + R + o_f).to(tl.int64) * stride_do_t).to(tl.float32)
    if HAS_MASK:
        # selection: a masked-out step contributes nothing, even when x is NaN there
        p_m = mask + i_b.to(tl.int64) * T + t_run
        b_m = tl.load(p_m + o_r).to(tl.float32)
        b_x = masked_input(b_x, b_m)
        if ACTIVATION != IDENTITY:
            b_h = masked_input(b_h, tl.load(p_m - HR + o_j).to(tl.float32))
            if not FROM_CARRY:
                b_f = masked_input(b_f, tl.load(p_m + R + o_f).to(tl.float32))
    b_g = b_do
    if ACTIVATION != IDENTITY:
        # pre-activation of the run rows (and of the W-1 rows after it unless carried), then dpre on
        # whole tiles
        b_pre = b_x
        b_pre_f = b_gf
        for j in tl.static_range(R if FROM_CARRY else R + W - 1):
            b_acc = b_bias
            for k in tl.static_range(W):
                b_acc = b_acc + _source(b_h, b_x, b_f, o_j, o_r, o_f, j - (W - 1) + k, R, HR) * _pick(b_w, o_k, k)
            if j < R:
                b_pre = tl.where(o_r == j, b_acc[None, :, :], b_pre)
            else:
                b_pre_f = tl.where(o_f == j - R, b_acc[None, :, :], b_pre_f)
        b_g = b_g * activation_grad(b_pre, ACTIVATION)
        if not FROM_CARRY:
            b_gf = b_gf * activation_grad(b_pre_f, ACTIVATION)

    # dx: each source row gathers the W outputs that read it
    b_dxe = b_g
    for r in tl.static_range(R):
        b_acc = _source(b_gf, b_g, b_gf, o_f, o_r, o_f, r + W - 1, R, HF) * _pick(b_w, o_k, 0)
        for k in tl.static_range(1, W):
            b_acc = b_acc + _source(b_gf, b_g, b_gf, o_f, o_r, o_f, r + W - 1 - k, R, HF) * _pick(b_w, o_k, k)
        b_dxe = tl.where(o_r == r, b_acc[None, :, :], b_dxe)
    if HAS_MASK:
        b_dxe = masked_input(b_dxe, b_m)
    if HAS_RESIDUAL:
        b_dxe += b_do
    p_dx = (dx + i_b.to(tl.int64) * stride_dx_b + o_c.to(tl.int64) * stride_dx_d
            + (t_run + o_r).to(tl.int64) * stride_dx_t)
    tl.store(p_dx, b_dxe.to(dx.dtype.element_ty))

    # dweight / dbias: sums over the in-thread run axis only, by source row (as the general tiles count
    # them: each (output, source) pair once)
    for k in tl.static_range(W):
        b_sum = _pick(b_x, o_r, 0) * _source(b_gf, b_g, b_gf, o_f, o_r, o_f, W - 1 - k, R, HF)
        for r in tl.static_range(1, R):
            b_sum = b_sum + _pick(b_x, o_r, r) * _source(b_gf, b_g, b_gf, o_f, o_r, o_f, r + W - 1 - k, R, HF)
        b_dw = tl.where(o_k == k, b_dw + b_sum[None, :, :], b_dw)
    if HAS_BIAS:
        b_db += tl.reduce(b_g, 0, add)
    # the dpre rows the tile before this one needs (when walking back in time)
    b_carry = b_gf
    for j in tl.static_range(HF):
        if j < R:
            b_carry = tl.where(o_f == j, _pick(b_g, o_r, j)[None, :, :], b_carry)
    return b_dw, b_db, b_carry


@triton.jit
def conv_bwd_runs_kernel(
    x, weight, bias, mask, seq_idx, cu_seqlens, h0, dout, dht, dx, dw_partial, scratch,
    T, D, N, n_search_steps, tiles_per_program, n_interior, n_chunks, t_tail,
    stride_x_b, stride_x_t, stride_x_d,
    stride_do_b, stride_do_t, stride_do_d,
    stride_dx_b, stride_dx_t, stride_dx_d,
    W: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, HAS_RESIDUAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRAD: tl.constexpr, EVEN_D: tl.constexpr,
    TIME_CONTIGUOUS: tl.constexpr, R: tl.constexpr, HR: tl.constexpr, HF: tl.constexpr, BK: tl.constexpr,
    CARRY: tl.constexpr, VEC: tl.constexpr,
):
    """Grid `(n_chunks + general tiles, D tiles, B)`. Program `i_c < n_chunks` walks interior tiles
    `i_c * tiles_per_program ..` (of `n_interior`, the first starting at step HR); the others each take one
    general tile: the HR steps before the interior, then BT-step tiles from `t_tail` to T.
    `dw_partial[i_b * grid0 + i_c]` gets each program's `[D, W+1]` weight/bias gradient."""
    tl.static_assert(EVEN_D and not HAS_SEQ_IDX and not IS_VARLEN, "conv_bwd_runs: full D tiles, no packing")
    tl.static_assert(not CARRY or (BT == R and HF <= R), "conv_bwd_runs: CARRY needs one run per tile, HF <= R")
    tl.static_assert(HR <= BT and BT % R == 0, "conv_bwd_runs: the first general tile holds the HR steps")
    i_c, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_p = i_b * tl.num_programs(0) + i_c
    if i_c < n_chunks:
        # VEC channels per access in channel-last (the thread's share of a row: fewer channels per thread
        # leave room for longer runs in registers)
        o_d = tl.max_contiguous(i_d * BD + tl.arange(0, BD), VEC)
        o_k = tl.arange(0, BK)[:, None, None]
        o_c = o_d[None, None, :]
        # loaded once per program; `_pick` turns the [BK, 1, BD] tiles into [1, BD] rows of the run layout
        b_w = tl.load(weight + o_c * W + o_k, mask=o_k < W, other=0.).to(tl.float32)
        if HAS_BIAS:
            b_bias = _pick(tl.load(bias + o_c + o_k * 0).to(tl.float32), o_k, 0)
        else:
            b_bias = _pick(tl.where(o_k < 0, b_w, 0.), o_k, 0)  # exact zeros whatever the weights hold
        b_dw = tl.full([BK, BT // R, BD], 0., tl.float32)
        b_db = tl.full([BT // R, BD], 0., tl.float32)
        i_t_begin = i_c * tiles_per_program
        i_t_end = tl.minimum(i_t_begin + tiles_per_program, n_interior)
        if CARRY:
            # walk back in time: each tile hands the dpre of its first rows to the tile before it, so
            # only the program's last tile recomputes the rows after it
            b_dw, b_db, b_carry = _bwd_runs_tile(
                x, mask, dout, dx, b_w, b_bias, b_dw, b_db, b_db[None, :, :], i_b, HR + (i_t_end - 1) * BT, o_d,
                T, stride_x_b, stride_x_t, stride_x_d, stride_do_b, stride_do_t, stride_do_d,
                stride_dx_b, stride_dx_t, stride_dx_d,
                W, R, BT // R, HR, HF, BK, ACTIVATION, HAS_BIAS, HAS_MASK, HAS_RESIDUAL, False)
            for i_back in range(2, i_t_end - i_t_begin + 1):
                b_dw, b_db, b_carry = _bwd_runs_tile(
                    x, mask, dout, dx, b_w, b_bias, b_dw, b_db, b_carry, i_b, HR + (i_t_end - i_back) * BT, o_d,
                    T, stride_x_b, stride_x_t, stride_x_d, stride_do_b, stride_do_t, stride_do_d,
                    stride_dx_b, stride_dx_t, stride_dx_d,
                    W, R, BT // R, HR, HF, BK, ACTIVATION, HAS_BIAS, HAS_MASK, HAS_RESIDUAL, True)
        else:
            for i_t in range(i_t_begin, i_t_end):
                b_dw, b_db, _ = _bwd_runs_tile(
                    x, mask, dout, dx, b_w, b_bias, b_dw, b_db, b_db[None, :, :], i_b, HR + i_t * BT, o_d, T,
                    stride_x_b, stride_x_t, stride_x_d, stride_do_b, stride_do_t, stride_do_d,
                    stride_dx_b, stride_dx_t, stride_dx_d,
                    W, R, BT // R, HR, HF, BK, ACTIVATION, HAS_BIAS, HAS_MASK, HAS_RESIDUAL, False)
        # the one cross-thread sum of this program, in a fixed order
        o_k2 = tl.arange(0, BK)
        p_dw = dw_partial + (i_p.to(tl.int64) * D + o_d[None, :]) * (W + 1)
        tl.store(p_dw + o_k2[:, None], tl.reduce(b_dw, 1, add), mask=(o_k2 < W)[:, None])
        tl.store(p_dw + W, tl.reduce(b_db, 0, add)[None, :])
    else:
        # same channel layout as conv_bwd_kernel's tiles (at most 4 contiguous channels per access)
        o_d = tl.max_contiguous(i_d * BD + tl.arange(0, BD), 4)
        o_w = tl.arange(0, BW)
        o_r = tl.arange(0, BT)
        o_rh = tl.arange(0, BH)
        i_g = i_c - n_chunks
        t_start = tl.where(i_g == 0, 0, t_tail + (i_g - 1) * BT)
        t_stop = tl.where(i_g == 0, HR, t_start + BT)
        # this program's slice of the scratch (laid out like x: time-major when T is contiguous)
        if TIME_CONTIGUOUS:
            SCR_R: tl.constexpr = 1
            SCR_D: tl.constexpr = BT + BH
        else:
            SCR_R: tl.constexpr = BD
            SCR_D: tl.constexpr = 1
        i_s = (i_b * (tl.num_programs(0) - n_chunks) + i_g) * tl.num_programs(1) + i_d
        p_scr = scratch + i_s.to(tl.int64) * (BT + BH) * BD + tl.arange(0, BD)[None, :] * SCR_D
        b_dwg = tl.full([BW, BD], 0., tl.float32)
        # one tile per program: the scratch slice is fresh, no earlier reader to wait for
        b_dwg = bwd_tile_general(x, weight, bias, mask, seq_idx, cu_seqlens, h0, dout, dht, dx, p_scr, b_dwg, i_b,
                                 t_start, t_stop, o_r, o_rh, o_d, o_w, T, D, N, n_search_steps,
                                 stride_x_b, stride_x_t, stride_x_d, stride_do_b, stride_do_t, stride_do_d,
                                 stride_dx_b, stride_dx_t, stride_dx_d, W, BT, BH, BD, SCR_R,
                                 ACTIVATION, HAS_BIAS, HAS_MASK, HAS_SEQ_IDX, HAS_RESIDUAL, IS_VARLEN,
                                 USE_INITIAL_STATE, USE_FINAL_STATE_GRAD, False)
        p_dwg = dw_partial + (i_p.to(tl.int64) * D + o_d[None, :]) * (W + 1) + o_w[:, None]
        tl.store(p_dwg, b_dwg, mask=o_w[:, None] < W + 1)
