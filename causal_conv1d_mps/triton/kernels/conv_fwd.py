"""Forward kernel shared by `causal_conv1d` ((B, D, T), either memory layout) and `short_conv_fused`
((B, T, D) with mask, residual and packed sequences).

Both ops see `x` as `[B, T, D]` through strides; Triton specialises the stride that equals 1, so the
same source gives vectorised loads along D for channel-last inputs and along T for contiguous ones.
Grid: (T tiles, D tiles, B). T tiles vary fastest so that the W-1 halo rows a program re-reads were
loaded by its neighbour moments earlier and still sit in L2.
"""
import triton
import triton.language as tl

from .common import activation, conv_pre_interior, conv_tile_general


@triton.jit
def conv_fwd_kernel(
    x, weight, bias, mask, seq_idx, cu_seqlens, h0, out,
    T, D, N, n_search_steps,
    stride_x_b, stride_x_t, stride_x_d,
    stride_o_b, stride_o_t, stride_o_d,
    W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, HAS_RESIDUAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, EVEN_D: tl.constexpr,
):
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    p_x = x + i_b.to(tl.int64) * stride_x_b + o_d.to(tl.int64)[None, :] * stride_x_d
    p_o = (out + i_b.to(tl.int64) * stride_o_b + o_t.to(tl.int64)[:, None] * stride_o_t
           + o_d.to(tl.int64)[None, :] * stride_o_d)
    # most tiles have every tap inside x: they take a path without masks
    if EVEN_D and not HAS_SEQ_IDX and not IS_VARLEN:
        is_interior = (i_t * BT >= W - 1) & ((i_t + 1) * BT <= T)
    else:
        is_interior = i_t < 0
    if is_interior:
        b_out = conv_pre_interior(x, weight, bias, mask, i_b, o_t, o_d, T, stride_x_b, stride_x_t, stride_x_d,
                                  W, BT, BD, HAS_BIAS, HAS_MASK)
        b_out = activation(b_out, ACTIVATION)
        if HAS_RESIDUAL:
            b_out += tl.load(p_x + o_t.to(tl.int64)[:, None] * stride_x_t).to(tl.float32)
        tl.store(p_o, b_out.to(out.dtype.element_ty))
    else:
        conv_tile_general(x, weight, bias, mask, seq_idx, cu_seqlens, h0, p_x, p_o, i_b, o_t, o_d, T, D, N,
                          n_search_steps, stride_x_b, stride_x_t, stride_x_d, W, BT, BD,
                          ACTIVATION, HAS_BIAS, HAS_MASK, HAS_SEQ_IDX, HAS_RESIDUAL, IS_VARLEN, USE_INITIAL_STATE)
