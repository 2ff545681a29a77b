"""Decode-step kernel: L new tokens per row against a rolling convolution state, updated in place.

Grid: (D tiles, B). The program owns its row's slice of the state, so it reads every state entry it
needs, waits at a barrier, then writes: no other program touches that slice (rows whose
`conv_state_indices` collide are the caller's error, as in every decode cache).
Relative position `r = i - (W-1) + k` of tap k of token i: `r >= 0` is token r of this call, `r < 0`
is state entry `S + r` (shift mode) or `(cache_seqlens + r) mod S` (circular mode).

Whatever values it reads, the kernel addresses only the tensors it was given: the api passes circular
positions already reduced to [0, S), and the kernel reduces them again in 64 bits (a negative or huge
position must never become an address outside the state), and clamps the slot index it dereferences.
Padding rows read nothing (masked loads) and output exactly 0.
"""
import triton
import triton.language as tl

from .common import activation


@triton.jit
def short_conv_update_kernel(
    x, conv_state, weight, bias, cache_seqlens, state_indices, out,
    L, D, S, N,
    stride_x_b, stride_x_l, stride_x_d,
    stride_o_b, stride_o_l, stride_o_d,
    stride_s_n, stride_s_d, stride_s_s,
    W: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    IS_CIRCULAR: tl.constexpr, HAS_STATE_INDICES: tl.constexpr,
):
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    # scalar conditions are broadcast to [BD] before combining with masks: Triton's interpreter
    # turns `bool vector & bool scalar` into int32, which tl.load then rejects as a mask
    o_zero = o_d * 0
    if HAS_STATE_INDICES:
        i_n = tl.load(state_indices + i_b)
        # negative = padding slot; >= N cannot be checked without a sync, so it is padding too
        is_live = (o_zero + i_n >= 0) & (o_zero + i_n < N)
    else:
        i_n = i_b
        is_live = o_zero == 0
    m_live = m_d & is_live
    if IS_CIRCULAR:
        b_pos = tl.load(cache_seqlens + i_b).to(tl.int64)
        b_pos = (b_pos % S + S) % S  # in [0, S) whichever sign convention `%` follows
    p_x = x + i_b.to(tl.int64) * stride_x_b + o_d.to(tl.int64) * stride_x_d
    p_o = out + i_b.to(tl.int64) * stride_o_b + o_d.to(tl.int64) * stride_o_d
    p_s = conv_state + tl.maximum(tl.minimum(i_n, N - 1), 0).to(tl.int64) * stride_s_n + o_d.to(tl.int64) * stride_s_d
    if HAS_BIAS:
        b_bias = tl.load(bias + o_d, mask=m_d, other=0.).to(tl.float32)

    # phase 1: outputs, reading the state as it was before this call
    for i in range(0, L):
        b_out = tl.full([BD], 0., tl.float32)
        if HAS_BIAS:
            b_out += b_bias
        for k in tl.static_range(W):
            r = i - (W - 1) + k
            b_v = tl.load(p_x + r.to(tl.int64) * stride_x_l, mask=m_live & (o_zero + r >= 0), other=0.).to(tl.float32)
            if IS_CIRCULAR:
                o_r = (b_pos + r + S) % S  # r >= -(W-1) >= -S: a non-negative dividend
            else:
                o_r = S + r
            b_v += tl.load(p_s + o_r.to(tl.int64) * stride_s_s, mask=m_live & (o_zero + r < 0), other=0.).to(tl.float32)
            b_w = tl.load(weight + o_d * W + k, mask=m_d, other=0.).to(tl.float32)
            b_out += b_v * b_w
        b_out = activation(b_out, ACTIVATION)
        if HAS_RESIDUAL:
            b_out += tl.load(p_x + i * stride_x_l, mask=m_live, other=0.).to(tl.float32)
        b_out = tl.where(m_live, b_out, 0.)
        tl.store(p_o + i * stride_o_l, b_out.to(out.dtype.element_ty), mask=m_d)
    tl.debug_barrier()

    # phase 2: the state update
    if IS_CIRCULAR:
        # with L > S only the last S tokens survive
        for i in range(tl.maximum(L - S, 0), L):
            o_r = (b_pos + i) % S
            b_v = tl.load(p_x + i * stride_x_l, mask=m_live, other=0.)
            tl.store(p_s + o_r.to(tl.int64) * stride_s_s, b_v.to(conv_state.dtype.element_ty), mask=m_live)
    else:
        # new[j] = old[j + L] while that is inside the state, else token j + L - S. Chunks go up in j
        # and read only at j + L >= j, so a chunk never reads what an earlier chunk wrote.
        for j0 in range(0, S, BS):
            o_j = j0 + tl.arange(0, BS)
            m_j = o_j < S
            o_r = o_j + L - S
            m_2d = m_live[:, None] & m_j[None, :]
            b_new = tl.load(p_x[:, None] + o_r.to(tl.int64)[None, :] * stride_x_l,
                            mask=m_2d & (o_r >= 0)[None, :], other=0.)
            b_old = tl.load(p_s[:, None] + (o_j + L).to(tl.int64)[None, :] * stride_s_s,
                            mask=m_2d & (o_r < 0)[None, :], other=0.)
            b_new = tl.where((o_r >= 0)[None, :], b_new, b_old.to(b_new.dtype))
            tl.debug_barrier()
            tl.store(p_s[:, None] + o_j.to(tl.int64)[None, :] * stride_s_s, b_new.to(b_old.dtype), mask=m_2d)
