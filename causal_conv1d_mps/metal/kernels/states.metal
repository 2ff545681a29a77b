// Small helper kernels shared by the ops: gathering states (final states of
// the forward passes, causal_conv1d_varlen_states) and the fixed-order
// reduction of weight-gradient partial rows.

// out (N, D, state_len) = the last state_len positions of each stream, where
// a stream is one batch row (no cu_seqlens) or one packed sequence, its input
// masked where a mask is given, and extended on the left by its initial states
// (or zeros). One thread per output element.
// Buffers: 0 x (storage T)  1 initial states (N, D, state_len) f32
//   2 mask (B, T) f32  3 cu_seqlens (N+1) i32  4 out (storage T)  5 params
// Params: the int64 slots GATHER_* of the generated contract header.
template <typename T>
[[kernel]] void gather_states(
    device const T* x [[buffer(0)]],
    device const float* init [[buffer(1)]],
    device const float* mask [[buffer(2)]],
    device const int* cu_seqlens [[buffer(3)]],
    device T* out [[buffer(4)]],
    constant long* p [[buffer(5)]],
    uint tid [[thread_position_in_grid]]) {
  const long D = p[GATHER_D];
  const long state_len = p[GATHER_STATE_LEN];
  const long len = p[GATHER_T];
  const long flags = p[GATHER_FLAGS];
  const long i = long(tid);
  if (i >= p[GATHER_N] * D * state_len) {
    return;
  }
  const long j = i % state_len;
  const long d = (i / state_len) % D;
  const long n = i / (state_len * D);
  const bool has_cu = (flags & CC_HAS_CU) != 0;
  const long b = has_cu ? 0 : n;
  const long start = has_cu ? long(cu_seqlens[n]) : 0;
  const long end = has_cu ? long(cu_seqlens[n + 1]) : len;
  const long pos = end - state_len + j;
  if (pos >= start) {
    const T v = x[b * p[GATHER_X_STRIDE_B] + pos * p[GATHER_X_STRIDE_T] +
                  d * p[GATHER_X_STRIDE_D]];
    if ((flags & CC_HAS_MASK) != 0) {
      // Selected, not multiplied: a masked position holds 0 even where x is NaN.
      const float m = mask[b * len + pos];
      out[i] = static_cast<T>(m == 0.0f ? 0.0f : static_cast<float>(v) * m);
    } else {
      out[i] = v;
    }
  } else if ((flags & CC_HAS_INIT) != 0) {
    out[i] = static_cast<T>(init[(n * D + d) * state_len + state_len + (pos - start)]);
  } else {
    out[i] = static_cast<T>(0.0f);
  }
}

// out[c] = sum over rows r = 0, 1, ... of part[r, c], always in that order.
// Params: the int64 slots REDUCE_* of the generated contract header.
[[kernel]] void reduce_rows_float(
    device const float* part [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant long* p [[buffer(2)]],
    uint tid [[thread_position_in_grid]]) {
  const long rows = p[REDUCE_ROWS];
  const long cols = p[REDUCE_COLS];
  const long c = long(tid);
  if (c >= cols) {
    return;
  }
  float s = 0.0f;
  for (long r = 0; r < rows; ++r) {
    s += part[r * cols + c];
  }
  out[c] = s;
}

CC_INSTANTIATE_TYPES(gather_states, CC_INSTANTIATE_T)
