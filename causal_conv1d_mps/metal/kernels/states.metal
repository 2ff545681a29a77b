// Small helper kernels shared by the ops: gathering states (final states of
// the forward passes, causal_conv1d_varlen_states) and the fixed-order
// reduction of weight-gradient partial rows.

// out (N, D, state_len) = the last state_len positions of each stream, where
// a stream is one batch row (no cu_seqlens) or one packed sequence, its input
// masked where a mask is given, and extended on the left by its initial states
// (or zeros). One thread per output element.
// Buffers: 0 x (storage T)  1 initial states (N, D, state_len) f32
//   2 mask (B, T) f32  3 cu_seqlens (N+1) i32  4 out (storage T)  5 params
// Params (int64): 0 N  1 D  2 state_len  3 T  4..6 x strides (b, t, d)  7 flags
template <typename T>
[[kernel]] void gather_states(
    device const T* x [[buffer(0)]],
    device const float* init [[buffer(1)]],
    device const float* mask [[buffer(2)]],
    device const int* cu_seqlens [[buffer(3)]],
    device T* out [[buffer(4)]],
    constant long* p [[buffer(5)]],
    uint tid [[thread_position_in_grid]]) {
  const long D = p[1];
  const long state_len = p[2];
  const long len = p[3];
  const long flags = p[7];
  const long i = long(tid);
  if (i >= p[0] * D * state_len) {
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
    const T v = x[b * p[4] + pos * p[5] + d * p[6]];
    if ((flags & CC_HAS_MASK) != 0) {
      out[i] = static_cast<T>(static_cast<float>(v) * mask[b * len + pos]);
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
// Params (int64): 0 rows  1 columns.
[[kernel]] void reduce_rows_float(
    device const float* part [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant long* p [[buffer(2)]],
    uint tid [[thread_position_in_grid]]) {
  const long rows = p[0];
  const long cols = p[1];
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
