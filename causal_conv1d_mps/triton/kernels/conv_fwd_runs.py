"""Forward kernel with per-thread time runs: each input element is loaded and converted once per tile,
and the W taps are formed in registers (a sliding window inside each thread).

Same arguments and semantics as `conv_fwd.conv_fwd_kernel` plus three tile constants; the launcher picks
one kernel or the other per shape (`.._config.conv_tiles`, docs/PERF_NOTES.md v5).

An interior tile is `[R, G, BD]`: G runs of R consecutive time steps for BD channels. The R axis lies
inside each thread (in the contiguous layout it is the 16-byte vector, in channel-last every thread
repeats its 16-byte channel vector over R rows), so a compile-time slot of it is one register. Triton has
no register shift, so a slot is read with a masked bitwise OR over that axis (`_pick`): each lane of the
mask is a compile-time constant, LLVM folds `x | 0` and the select, and nothing is left but the register.
The W-1 steps before each run come from a second load of HR rows (`halo`), which hits L1: the previous
run was loaded by the neighbouring thread of the same program.

Tiles that touch a boundary (first tile, last partial tile, partial D, packed sequences) take the
shifted-reload path of `conv_fwd`, shared through `common`.
"""
import triton
import triton.language as tl

from .common import activation, conv_tile_general


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _pick(tile, o_r, slot: tl.constexpr):
    """Slot `slot` of the in-thread axis 0 of a float32 `[S, G, BD]` tile, as `[G, BD]`."""
    bits = tile.to(tl.int32, bitcast=True)
    return tl.reduce(tl.where(o_r == slot, bits, 0), 0, _or).to(tl.float32, bitcast=True)


@triton.jit
def _conv_runs(x, weight, bias, mask, i_b, t0, o_d, T, stride_x_b, stride_x_t, stride_x_d,
               W: tl.constexpr, R: tl.constexpr, G: tl.constexpr, HR: tl.constexpr, BW: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, ACTIVATION: tl.constexpr,
               HAS_RESIDUAL: tl.constexpr):
    """`[R, G, BD]` output rows `t0 + g*R + r` of an interior tile (float32); the caller stores them."""
    o_r = tl.arange(0, R)[:, None, None]
    o_j = tl.arange(0, HR)[:, None, None]
    o_g = tl.arange(0, G)[None, :, None]
    o_c = o_d[None, None, :]
    p_x = x + i_b.to(tl.int64) * stride_x_b + o_c.to(tl.int64) * stride_x_d
    t_run = t0 + o_g * R
    b_raw = tl.load(p_x + (t_run + o_r).to(tl.int64) * stride_x_t)
    b_x = b_raw.to(tl.float32)
    b_h = tl.load(p_x + (t_run - HR + o_j).to(tl.int64) * stride_x_t).to(tl.float32)
    if HAS_MASK:
        # selection, not a product alone: a masked-out step contributes nothing even when x is NaN there
        p_m = mask + i_b.to(tl.int64) * T
        b_m = tl.load(p_m + t_run + o_r).to(tl.float32)
        b_x = tl.where(b_m != 0., b_x * b_m, 0.)
        b_hm = tl.load(p_m + t_run - HR + o_j).to(tl.float32)
        b_h = tl.where(b_hm != 0., b_h * b_hm, 0.)
    o_k = tl.arange(0, BW)[:, None, None]
    b_w = tl.load(weight + o_c * W + o_k, mask=o_k < W, other=0.).to(tl.float32)
    if HAS_BIAS:
        b_bias = _pick(tl.load(bias + o_c + o_k * 0).to(tl.float32), o_k, 0)
    else:
        b_bias = _pick(tl.where(o_k < 0, b_w, 0.), o_k, 0)  # exact zeros whatever the weights hold
    b_out = b_x
    for r in tl.static_range(R):
        b_acc = b_bias
        for k in tl.static_range(W):
            if r - (W - 1) + k >= 0:
                b_src = _pick(b_x, o_r, r - (W - 1) + k)
            else:
                b_src = _pick(b_h, o_j, HR + r - (W - 1) + k)
            b_acc = b_acc + b_src * _pick(b_w, o_k, k)
        b_out = tl.where(o_r == r, b_acc[None, :, :], b_out)
    b_out = activation(b_out, ACTIVATION)
    if HAS_RESIDUAL:
        b_out += b_raw.to(tl.float32)
    return b_out


@triton.jit
def conv_fwd_runs_kernel(
    x, weight, bias, mask, seq_idx, cu_seqlens, h0, out,
    T, D, N, n_search_steps,
    stride_x_b, stride_x_t, stride_x_d,
    stride_o_b, stride_o_t, stride_o_d,
    W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, HAS_RESIDUAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, EVEN_D: tl.constexpr,
    R: tl.constexpr, HR: tl.constexpr, BW: tl.constexpr,
):
    """out[b, t, d] = (x if residual) + act(bias + conv(xe)) over a `[BT, BD]` tile; BT = G * R, HR >= W - 1."""
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_d = i_d * BD + tl.arange(0, BD)
    if EVEN_D and not HAS_SEQ_IDX and not IS_VARLEN:
        is_interior = (i_t * BT >= HR) & ((i_t + 1) * BT <= T)
    else:
        is_interior = i_t < 0
    if is_interior:
        t0 = i_t * BT
        b_run = _conv_runs(x, weight, bias, mask, i_b, t0, o_d, T, stride_x_b, stride_x_t, stride_x_d,
                           W, R, BT // R, HR, BW, HAS_BIAS, HAS_MASK, ACTIVATION, HAS_RESIDUAL)
        o_tr = t0 + tl.arange(0, BT // R)[None, :, None] * R + tl.arange(0, R)[:, None, None]
        p_run = (out + i_b.to(tl.int64) * stride_o_b + o_tr.to(tl.int64) * stride_o_t
                 + o_d.to(tl.int64)[None, None, :] * stride_o_d)
        tl.store(p_run, b_run.to(out.dtype.element_ty))
    else:
        o_t = i_t * BT + tl.arange(0, BT)
        p_x = x + i_b.to(tl.int64) * stride_x_b + o_d.to(tl.int64)[None, :] * stride_x_d
        p_o = (out + i_b.to(tl.int64) * stride_o_b + o_t.to(tl.int64)[:, None] * stride_o_t
               + o_d.to(tl.int64)[None, :] * stride_o_d)
        conv_tile_general(x, weight, bias, mask, seq_idx, cu_seqlens, h0, p_x, p_o, i_b, o_t, o_d, T, D, N,
                          n_search_steps, stride_x_b, stride_x_t, stride_x_d, W, BT, BD,
                          ACTIVATION, HAS_BIAS, HAS_MASK, HAS_SEQ_IDX, HAS_RESIDUAL, IS_VARLEN, USE_INITIAL_STATE)
