"""Device helpers shared by the forward, backward and state kernels.

Vocabulary used in every kernel file (flash-linear-attention habits):
`i_` program ids, `o_` offsets, `m_` masks, `b_` block values, `p_` pointers.
A *source* position `s` is a time step of the extended input `xe`: `s >= bos` reads `x[s]` (times the
mask), `bos - (W-1) <= s < bos` reads the initial state of that sequence, anything earlier is zero.
`bos`/`eos` are the first and one-past-last time steps of the sequence a row belongs to.

Only builtins of `triton.language` are used here and in the kernels (no `tl.sum`, `tl.zeros`,
`tl.sigmoid`): those library helpers are themselves `@triton.jit` functions, built compiled or
interpreted once when triton is imported, so they would not run inside the interpreted copy of these
kernels (see `.._loader`).

Masking is by selection (`tl.where`, or a masked load with `other=0`), never by multiplying with 0: a
NaN or Inf outside a sequence (another packed sequence, a padding position, a position whose attention
mask is 0) must not reach it (NaN * 0 is NaN). `masked_input` applies an attention mask that way.
"""
import os

import triton
import triton.language as tl

from ... import _activation


def _interpreting() -> bool:
    """Whether this copy of the kernels is being decorated for Triton's interpreter (see `.._loader`)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Compiled, the sigmoid uses the special-function unit's approximate 2**x and 1/x directly (about 2 ulp):
# `tl.exp` and `/` add range fix-ups around them that made SiLU a third of the forward's instructions
# (docs/PERF_NOTES.md, v4). The interpreter cannot run PTX and keeps the plain formula.
FAST_SIGMOID = tl.constexpr(not _interpreting())


@triton.jit
def _add(a, b):
    return a + b


# The combine function of every `tl.reduce` sum. The interpreter runs a reduce with a user combine
# function element by element in Python (a [256, 4] tile costs about a thousand Python calls, once per
# tap: W = 257 took minutes); given Triton's own sum combine it calls numpy's sum instead, without ever
# calling the function. Compiled kernels keep `_add` (their PTX is unchanged).
add = getattr(tl.standard, "_sum_combine", _add) if _interpreting() else _add


@triton.jit
def sigmoid(b_x):
    if FAST_SIGMOID:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 e; ex2.approx.ftz.f32 e, $1; add.ftz.f32 e, e, 0f3F800000; rcp.approx.ftz.f32 $0, e; }",
            "=f,f", [b_x * -1.4426950408889634], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 1.0 / (1.0 + tl.exp(-b_x))


# The codes of `causal_conv1d_mps._activation`, the registry every layer shares; the kernels take one as the
# constexpr `ACTIVATION`, so each activation compiles to its own specialisation with no runtime branch.
IDENTITY = tl.constexpr(_activation.IDENTITY)
SILU = tl.constexpr(_activation.SILU)

# The masked (general) paths unroll their taps up to this width and loop at run time past it: unrolled,
# each masked tap is a block of loads and selects, and at W = 16 they took most of a kernel's compile time
# (the fp32 fused backward with mask and states: 36 s for sm_90, 10 s with the loops). The unmasked interior
# paths, which carry the bulk of the work, stay unrolled at every width.
UNROLL_MAX_W = tl.constexpr(8)


@triton.jit
def activation(b_x, ACTIVATION: tl.constexpr):
    """The activation `ACTIVATION` (a registry code) of the float32 pre-activation `b_x`."""
    if ACTIVATION == SILU:
        return b_x * sigmoid(b_x)
    else:
        tl.static_assert(ACTIVATION == IDENTITY, "activation: unknown code")
        return b_x


@triton.jit
def activation_grad(b_x, ACTIVATION: tl.constexpr):
    """d activation / d pre at `b_x`, for every code but IDENTITY: its derivative is 1, so the kernels skip
    it and the recomputation of the pre-activation (`if ACTIVATION != IDENTITY`)."""
    tl.static_assert(ACTIVATION == SILU, "activation_grad: unknown code (IDENTITY never reaches it)")
    b_sig = sigmoid(b_x)
    return b_sig * (1.0 + b_x * (1.0 - b_sig))


@triton.jit
def masked_input(b_x, b_m):
    """`x * mask` where the mask is non-zero, exactly 0 where it is 0 (even when x there is NaN or Inf)."""
    return tl.where(b_m != 0., b_x * b_m, 0.)


@triton.jit
def find_sequence(cu_seqlens, o_t, N, n_search_steps):
    """For each time step in `o_t`, the index of its packed sequence and that sequence's bounds.

    A binary search over `cu_seqlens` inside the kernel keeps the launch free of host syncs (the grid
    does not depend on the sequence lengths). With empty sequences the last one starting at `o_t` wins.
    """
    i_lo = o_t * 0
    i_hi = i_lo + (N - 1)
    for _ in range(n_search_steps):
        i_mid = (i_lo + i_hi + 1) // 2
        b_start = tl.load(cu_seqlens + i_mid)
        i_lo = tl.where(b_start <= o_t, i_mid, i_lo)
        i_hi = tl.where(b_start <= o_t, i_hi, i_mid - 1)
    bos = tl.load(cu_seqlens + i_lo)
    eos = tl.load(cu_seqlens + i_lo + 1)
    return i_lo, bos, eos


@triton.jit
def row_sequences(seq_idx, cu_seqlens, i_b, o_t, m_t, T, N, n_search_steps,
                  HAS_SEQ_IDX: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Where the rows `o_t` of batch row `i_b` stand: `(i_h, bos, eos, b_seq, ok_h)`.

    `i_h` is the initial-state row of each row (the batch row, or its packed sequence), `bos`/`eos` its
    sequence bounds, `b_seq` its `seq_idx` value (-1 outside `m_t`; `o_t` itself without `seq_idx`), and
    `ok_h` whether it may read the initial states (those belong to the sequence at position 0 of the row).
    """
    if IS_VARLEN:
        i_h, bos, eos = find_sequence(cu_seqlens, o_t, N, n_search_steps)
    else:
        i_h = o_t * 0 + i_b
        bos = 0
        eos = T
    if HAS_SEQ_IDX:
        p_seq = seq_idx + i_b.to(tl.int64) * T
        b_seq = tl.load(p_seq + o_t, mask=m_t, other=-1)
        ok_h = b_seq == tl.load(p_seq)
    else:
        b_seq = o_t
        ok_h = m_t
    return i_h, bos, eos, b_seq, ok_h


@triton.jit
def stream_bounds(cu_seqlens, i_r, T, IS_VARLEN: tl.constexpr):
    """`(i_b, bos, eos)` of stream `i_r`: batch row `i_r`, or packed sequence `i_r` of batch row 0."""
    if IS_VARLEN:
        i_b = i_r * 0
        bos = tl.load(cu_seqlens + i_r)
        eos = tl.load(cu_seqlens + i_r + 1)
    else:
        i_b = i_r
        bos = 0
        eos = T
    return i_b, bos, eos


@triton.jit
def load_source(x, mask, h0, i_b, i_h, o_s, o_d, m_d, ok_x, ok_h, bos, T, D,
                stride_x_b, stride_x_t, stride_x_d,
                W: tl.constexpr, HAS_MASK: tl.constexpr, USE_INITIAL_STATE: tl.constexpr):
    """The extended input `xe` at source rows `o_s` (float32, [len(o_s), BD]).

    `ok_x` / `ok_h` say per row whether the tap may read `x` / the initial state at all (row in range,
    same sequence id); `i_h` (one per row) is the initial-state row: the batch row, or the packed sequence.
    """
    # bounds by T too: under torch.compile cu_seqlens is not checked, and a bad one must not read outside x
    m_x = ok_x & (o_s >= bos) & (o_s >= 0) & (o_s < T)
    p_x = (x + i_b.to(tl.int64) * stride_x_b + o_s.to(tl.int64)[:, None] * stride_x_t
           + o_d.to(tl.int64)[None, :] * stride_x_d)
    b_x = tl.load(p_x, mask=m_x[:, None] & m_d[None, :], other=0.).to(tl.float32)
    if HAS_MASK:
        b_m = tl.load(mask + i_b.to(tl.int64) * T + o_s, mask=m_x, other=0.).to(tl.float32)
        b_x = masked_input(b_x, b_m[:, None])
    if USE_INITIAL_STATE:
        o_j = o_s - bos + (W - 1)
        m_h = ok_h & (o_s < bos) & (o_j >= 0)
        p_h = h0 + (i_h.to(tl.int64) * D * (W - 1) + o_j)[:, None] + o_d[None, :] * (W - 1)
        b_x += tl.load(p_h, mask=m_h[:, None] & m_d[None, :], other=0.).to(tl.float32)
    return b_x


@triton.jit
def conv_pre(x, weight, bias, mask, seq_idx, h0, i_b, i_h, o_t, o_d, m_t, m_d, bos, b_seq_t, ok_h, T, D,
             stride_x_b, stride_x_t, stride_x_d,
             W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
             HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
             USE_INITIAL_STATE: tl.constexpr):
    """Pre-activation `bias + sum_k weight[:, k] * xe[t - (W-1) + k]` for the rows `o_t` (float32).

    Each tap is a shifted re-load of the same tile: the W-1 rows of halo and the overlap between taps
    come from L1/L2, so device memory sees each input once.
    """
    b_pre = tl.full([BT, BD], 0., tl.float32)
    if HAS_BIAS:
        b_pre += tl.load(bias + o_d, mask=m_d, other=0.).to(tl.float32)[None, :]
    if W <= UNROLL_MAX_W:
        for k in tl.static_range(W):
            b_pre = conv_pre_tap(b_pre, x, weight, mask, seq_idx, h0, i_b, i_h, o_t, o_d, m_t, m_d, bos, b_seq_t,
                                 ok_h, T, D, stride_x_b, stride_x_t, stride_x_d, k, W,
                                 HAS_MASK, HAS_SEQ_IDX, USE_INITIAL_STATE)
    else:
        for k in range(W):
            b_pre = conv_pre_tap(b_pre, x, weight, mask, seq_idx, h0, i_b, i_h, o_t, o_d, m_t, m_d, bos, b_seq_t,
                                 ok_h, T, D, stride_x_b, stride_x_t, stride_x_d, k, W,
                                 HAS_MASK, HAS_SEQ_IDX, USE_INITIAL_STATE)
    return b_pre


@triton.jit
def conv_pre_tap(b_pre, x, weight, mask, seq_idx, h0, i_b, i_h, o_t, o_d, m_t, m_d, bos, b_seq_t, ok_h, T, D,
                 stride_x_b, stride_x_t, stride_x_d, k, W: tl.constexpr,
                 HAS_MASK: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, USE_INITIAL_STATE: tl.constexpr):
    """`b_pre` plus tap `k` of `conv_pre` (`k` a constant when unrolled, a loop counter past UNROLL_MAX_W)."""
    o_s = o_t - (W - 1) + k
    ok_x = m_t
    if HAS_SEQ_IDX:
        b_seq_s = tl.load(seq_idx + i_b.to(tl.int64) * T + o_s, mask=m_t & (o_s >= 0), other=-2)
        ok_x = ok_x & (b_seq_s == b_seq_t)
    b_x = load_source(x, mask, h0, i_b, i_h, o_s, o_d, m_d, ok_x, ok_h, bos, T, D,
                      stride_x_b, stride_x_t, stride_x_d, W, HAS_MASK, USE_INITIAL_STATE)
    b_w = tl.load(weight + o_d * W + k, mask=m_d, other=0.).to(tl.float32)
    return b_pre + b_x * b_w[None, :]


@triton.jit
def conv_tile_general(x, weight, bias, mask, seq_idx, cu_seqlens, h0, p_x, p_o, i_b, o_t, o_d, T, D, N,
                      n_search_steps, stride_x_b, stride_x_t, stride_x_d,
                      W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                      ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                      HAS_SEQ_IDX: tl.constexpr, HAS_RESIDUAL: tl.constexpr, IS_VARLEN: tl.constexpr,
                      USE_INITIAL_STATE: tl.constexpr):
    """The forward of output rows `o_t` x channels `o_d` with every mask (tile edges, packed sequences,
    padding, initial states), stored at `p_o` (`[BT, BD]` pointers): the path of the tiles the forward
    kernels' fast paths skip. `p_x` (`[1, BD]`) points at row 0 of the tile's channels, for the residual."""
    m_t = o_t < T
    m_d = o_d < D
    i_h, bos, eos, b_seq_t, ok_h = row_sequences(seq_idx, cu_seqlens, i_b, o_t, m_t, T, N, n_search_steps,
                                                 HAS_SEQ_IDX, IS_VARLEN)
    b_out = conv_pre(x, weight, bias, mask, seq_idx, h0, i_b, i_h, o_t, o_d, m_t, m_d, bos, b_seq_t, ok_h,
                     T, D, stride_x_b, stride_x_t, stride_x_d, W, BT, BD,
                     HAS_BIAS, HAS_MASK, HAS_SEQ_IDX, USE_INITIAL_STATE)
    b_out = activation(b_out, ACTIVATION)
    if HAS_SEQ_IDX:
        b_out = tl.where((b_seq_t >= 0)[:, None], b_out, 0.)
    m_td = m_t[:, None] & m_d[None, :]
    if HAS_RESIDUAL:
        # the residual is the unmasked input; this re-load hits the tile the last tap just read
        b_out += tl.load(p_x + o_t.to(tl.int64)[:, None] * stride_x_t, mask=m_td, other=0.).to(tl.float32)
    tl.store(p_o, b_out.to(p_o.dtype.element_ty), mask=m_td)


@triton.jit
def conv_pre_interior(x, weight, bias, mask, i_b, o_t, o_d, T, stride_x_b, stride_x_t, stride_x_d,
                      W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr):
    """`conv_pre` for a tile whose taps all fall inside `x` (no sequence boundary, D tile full).

    No masks: a masked load zero-fills its registers first, which costs about as much as the load
    itself, once per tap (see docs/PERF_NOTES.md).
    """
    b_pre = tl.full([BT, BD], 0., tl.float32)
    if HAS_BIAS:
        b_pre += tl.load(bias + o_d).to(tl.float32)[None, :]
    p_x = x + i_b.to(tl.int64) * stride_x_b + o_d.to(tl.int64)[None, :] * stride_x_d
    for k in tl.static_range(W):
        o_s = o_t - (W - 1) + k
        b_x = tl.load(p_x + o_s.to(tl.int64)[:, None] * stride_x_t).to(tl.float32)
        if HAS_MASK:
            b_x = masked_input(b_x, tl.load(mask + i_b.to(tl.int64) * T + o_s).to(tl.float32)[:, None])
        b_pre += b_x * tl.load(weight + o_d * W + k).to(tl.float32)[None, :]
    return b_pre


@triton.jit
def loop_probe_kernel(out, n):
    """out[0] = n, counted by a loop with a run-time trip count (checks that the interpreter can run loops)."""
    b_count = tl.full([], 0, tl.int32)
    for _ in range(n):
        b_count += 1
    tl.store(out, b_count)
