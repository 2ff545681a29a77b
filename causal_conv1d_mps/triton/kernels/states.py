"""Kernel that gathers the last `state_len` steps of the extended input of each row or packed sequence.

Serves three callers: the final states of `causal_conv1d` and of `short_conv_fused` (`state_len = W-1`,
initial states prepended, mask applied) and `causal_conv1d_varlen_states` (any `state_len`, zeros on
the left). Grid: (D tiles, rows); each program loops over the state in chunks of BS columns.
"""
import triton
import triton.language as tl

from .common import masked_input, stream_bounds


@triton.jit
def gather_states_kernel(
    x, mask, h0, cu_seqlens, states,
    T, D, state_len,
    stride_x_b, stride_x_t, stride_x_d,
    W: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    HAS_MASK: tl.constexpr, IS_VARLEN: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
):
    i_d, i_r = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    i_b, bos, eos = stream_bounds(cu_seqlens, i_r, T, IS_VARLEN)
    p_x = x + i_b.to(tl.int64) * stride_x_b
    p_states = states + i_r.to(tl.int64) * D * state_len
    for j0 in range(0, state_len, BS):
        o_j = j0 + tl.arange(0, BS)
        m_j = o_j < state_len
        o_s = eos - state_len + o_j
        m_x = m_j & (o_s >= bos) & (o_s >= 0) & (o_s < T)  # in x even for an unchecked, bad cu_seqlens
        b_x = tl.load(p_x + o_s.to(tl.int64)[None, :] * stride_x_t + o_d.to(tl.int64)[:, None] * stride_x_d,
                      mask=m_d[:, None] & m_x[None, :], other=0.).to(tl.float32)
        if HAS_MASK:
            b_m = tl.load(mask + i_b.to(tl.int64) * T + o_s, mask=m_x, other=0.).to(tl.float32)
            b_x = masked_input(b_x, b_m[None, :])
        if USE_INITIAL_STATE:
            # a sequence shorter than W-1 keeps part of its initial state
            o_h = o_s - bos + (W - 1)
            m_h = m_j & (o_s < bos) & (o_h >= 0)
            p_h = h0 + i_r.to(tl.int64) * D * (W - 1) + o_d[:, None] * (W - 1) + o_h[None, :]
            b_x += tl.load(p_h, mask=m_d[:, None] & m_h[None, :], other=0.).to(tl.float32)
        tl.store(p_states + o_d[:, None] * state_len + o_j[None, :], b_x.to(states.dtype.element_ty),
                 mask=m_d[:, None] & m_j[None, :])
