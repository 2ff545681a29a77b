// Decode step: x (B, L, D) any strides, conv_state (N, D, S) any strides,
// updated in place. One thread per (b, d) channel: it reads the whole window
// it needs (the state entries before the first new token) and computes all L
// outputs before it writes any state entry, so no barrier is needed and
// L > S, S == W-1 are handled like any other case.
//
// Buffers: 0 x (storage T)  1 weight (D, W) f32  2 bias (D) f32
//   3 conv_state (storage T, read and written)  4 cache_seqlens (B) i32
//   5 conv_state_indices (B) i32  6 out (storage T)  7 params
// Params: the int64 slots UPDATE_* of the generated contract header.
// Shift mode: the state holds the last S inputs in time order. Circular mode
// (CC_CIRCULAR): input i of row b goes to (cache_seqlens[b] + i) % S.
// A state index < 0 or >= N marks padding: output 0, state untouched.

template <typename T, int W>
[[kernel]] void short_conv_update(
    device const T* x [[buffer(0)]],
    device const float* weight [[buffer(1)]],
    device const float* bias [[buffer(2)]],
    device T* state [[buffer(3)]],
    device const int* cache_seqlens [[buffer(4)]],
    device const int* state_indices [[buffer(5)]],
    device T* out [[buffer(6)]],
    constant long* p [[buffer(7)]],
    uint tid [[thread_position_in_grid]]) {
  const long B = p[UPDATE_B];
  const long L = p[UPDATE_L];
  const long D = p[UPDATE_D];
  const int w = W > 0 ? W : int(p[UPDATE_W]);
  const long S = p[UPDATE_S];
  const long flags = p[UPDATE_FLAGS];
  const long xsl = p[UPDATE_X_STRIDE_L];
  const long ss = p[UPDATE_STATE_STRIDE_S];
  const long d = long(tid) % D;
  const long b = long(tid) / D;
  if (b >= B) {
    return;
  }
  device T* orow =
      out + b * p[UPDATE_OUT_STRIDE_B] + d * p[UPDATE_OUT_STRIDE_D];
  const long osl = p[UPDATE_OUT_STRIDE_L];
  const long row = (flags & CC_HAS_INDICES) != 0 ? long(state_indices[b]) : b;
  if (row < 0 || row >= p[UPDATE_N]) {
    // Padding: zeros are stored, nothing is read (x or the state may be NaN).
    for (long i = 0; i < L; ++i) {
      orow[i * osl] = static_cast<T>(0.0f);
    }
    return;
  }
  const bool circular = (flags & CC_CIRCULAR) != 0;
  // Any cache_seqlens value is reduced into [0, S) here (cc_mod), so no
  // index below leaves the state row whatever the launcher passed.
  const long head = circular && S > 0 ? cc_mod(long(cache_seqlens[b]), S) : 0;
  device const T* xr =
      x + b * p[UPDATE_X_STRIDE_B] + d * p[UPDATE_X_STRIDE_D];
  device T* sr =
      state + row * p[UPDATE_STATE_STRIDE_N] + d * p[UPDATE_STATE_STRIDE_D];
  const float bias_d = (flags & CC_HAS_BIAS) != 0 ? bias[d] : 0.0f;
  const long activation = p[UPDATE_ACTIVATION];
  const bool residual = (flags & CC_RESIDUAL) != 0;

  // Phase 1: every output, reading the stream = (state window, new inputs).
  // Stream position p < 0 is the state entry -p steps before the first input
  // (S >= W-1, so -p <= S).
  for (long i = 0; i < L; ++i) {
    float acc = bias_d;
    for (int k = 0; k < w; ++k) {
      const long pos = i - (w - 1) + k;
      float v;
      if (pos >= 0) {
        v = static_cast<float>(xr[pos * xsl]);
      } else if (circular) {
        v = static_cast<float>(sr[cc_mod(head + pos, S) * ss]);
      } else {
        v = static_cast<float>(sr[(S + pos) * ss]);
      }
      acc = fma(weight[d * w + k], v, acc);
    }
    float y = cc_activation(activation, acc);
    if (residual) {
      y += static_cast<float>(xr[i * xsl]);
    }
    orow[i * osl] = static_cast<T>(y);
  }

  // Phase 2: the state update, after all reads of this channel's state.
  if (circular) {
    // Only the last S inputs survive when L > S (none when S == 0).
    for (long i = L > S ? L - S : 0; i < L; ++i) {
      sr[cc_mod(head + i, S) * ss] = xr[i * xsl];
    }
  } else {
    // Shift left by L, in increasing order: entry j reads j + L >= j, which
    // this loop has not overwritten yet.
    for (long j = 0; j < S; ++j) {
      const long src = j + L;
      sr[j * ss] = src < S ? sr[src * ss] : xr[(src - S) * xsl];
    }
  }
}

CC_INSTANTIATE_TYPES(short_conv_update, CC_INSTANTIATE_WIDTHS)
