// causal_conv1d on x (B, D, T): forward, input gradient, weight/bias partial
// gradients and initial-state gradient. Both memory layouts are served by the
// same kernels through strides: contiguous (runs of t are the fastest thread
// index) and channel-last (channels are the fastest thread index, so the
// threads of a SIMD-group read consecutive addresses).
//
// Every kernel here takes the same input buffers, in this order:
//   0 x (storage T)   1 weight (D, W) f32   2 bias (D) f32   3 seq_idx (B, T) i32
//   4 initial states (B, D, W-1) f32         5 dout (storage T)
//   6 dfinal states (B, D, W-1) f32          7.. the kernel's outputs, then params
// Absent optional inputs are bound to a one-element stand-in, never read (their
// flag is off). Params: the int64 slots CONV_* of the generated contract header.

template <typename T>
struct CausalConvCtx {
  device const T* x;
  device const float* w;
  device const float* b_ptr;
  device const int* seq;
  device const float* init;
  device const T* go;
  device const float* dfin;
  long B, D, len, width;
  long xsb, xsd, xst, gsb, gsd, gst;
  long activation;  // a CC_ACTIVATION_* code
  bool has_bias, has_seq, has_init, has_dfinal;

  float weight(long d, int k) const {
    return w[d * width + k];
  }
  float bias(long d) const {
    return has_bias ? b_ptr[d] : 0.0f;
  }
  // Positions before 0 belong to the sequence of position 0 (their states).
  Seg seg_first(long b, long t) const {
    Seg s;
    s.id = has_seq ? long(seq[b * len + (t > 0 ? t : 0)]) : 0;
    s.start = 0;
    return s;
  }
  // Two returns, not `has_seq ? seg_first(b, t) : prev`: a conditional
  // mixing a class prvalue and a `thread` lvalue is rejected by Metal.
  Seg seg_next(long b, long t, Seg prev) const {
    if (has_seq) {
      return seg_first(b, t);
    }
    return prev;
  }
  // Padding positions (seq_idx < 0) produce 0.
  bool silent(Seg s) const {
    return has_seq && s.id < 0;
  }
  // Whether position p of the extended input is a tap of segment s.
  bool live(long b, long p, Seg s) const {
    return !(has_seq && seg_first(b, p).id != s.id);
  }
  float tap(long b, long d, long p, Seg s) const {
    if (!live(b, p, s)) {
      return 0.0f;
    }
    if (p >= 0) {
      return static_cast<float>(x[b * xsb + d * xsd + p * xst]);
    }
    return has_init ? init[(b * D + d) * (width - 1) + (width - 1) + p] : 0.0f;
  }
  float dout(long b, long d, long t) const {
    return static_cast<float>(go[b * gsb + d * gsd + t * gst]);
  }
  float dfinal(long n, long d, long f) const {
    return dfin[(n * D + d) * (width - 1) + f];
  }
  long out_index(long b, long d, long t) const {
    return b * xsb + d * xsd + t * xst;
  }
  float finish(long b, long d, long t, float pre, Seg s) const {
    if (silent(s)) {
      return 0.0f;
    }
    return cc_activation(activation, pre);
  }
  // The final states are the last W-1 positions of the row, seq_idx or not.
  float finish_dx(long b, long d, long q, float acc, Seg s) const {
    const long f = q - (len - (width - 1));
    if (has_dfinal && f >= 0) {
      acc += dfinal(b, d, f);
    }
    return acc;
  }
  long state_batch(long n) const {
    return n;
  }
  long state_start(long n) const {
    return 0;
  }
  long state_end(long n) const {
    return len;
  }
  Seg state_seg(long n) const {
    return seg_first(n, 0);
  }
};

template <typename T>
inline CausalConvCtx<T> cc_make_ctx(
    device const T* x,
    device const float* weight,
    device const float* bias,
    device const int* seq_idx,
    device const float* init,
    device const T* dout,
    device const float* dfinal,
    constant long* p) {
  CausalConvCtx<T> c;
  c.x = x;
  c.w = weight;
  c.b_ptr = bias;
  c.seq = seq_idx;
  c.init = init;
  c.go = dout;
  c.dfin = dfinal;
  c.B = p[CONV_B];
  c.D = p[CONV_D];
  c.len = p[CONV_T];
  c.width = p[CONV_W];
  c.xsb = p[CONV_X_STRIDE_B];
  c.xsd = p[CONV_X_STRIDE_D];
  c.xst = p[CONV_X_STRIDE_T];
  c.gsb = p[CONV_G_STRIDE_B];
  c.gsd = p[CONV_G_STRIDE_D];
  c.gst = p[CONV_G_STRIDE_T];
  c.activation = p[CONV_ACTIVATION];
  const long flags = p[CONV_FLAGS];
  c.has_bias = (flags & CC_HAS_BIAS) != 0;
  c.has_seq = (flags & CC_HAS_SEQ) != 0;
  c.has_init = (flags & CC_HAS_INIT) != 0;
  c.has_dfinal = (flags & CC_HAS_DFINAL) != 0;
  return c;
}

// One thread per (b, d, run of `run` consecutive t). Returns false for the
// padding threads of the last threadgroup.
inline bool cc_thread_run(
    constant long* p, uint tid, thread long& b, thread long& d, thread long& t0,
    thread long& t1) {
  const long D = p[CONV_D];
  const long len = p[CONV_T];
  const long run = p[CONV_RUN];
  const long runs = p[CONV_RUNS];
  long i = long(tid);
  long r;
  if (p[CONV_CHANNEL_LAST] != 0) {
    d = i % D;
    i /= D;
    r = i % runs;
    b = i / runs;
  } else {
    r = i % runs;
    i /= runs;
    d = i % D;
    b = i / D;
  }
  t0 = r * run;
  t1 = t0 + run < len ? t0 + run : len;
  return b < p[CONV_B];
}

// Buffers 0..6, shared by every kernel of this file.
#define CC_INPUT_ARGS                              \
  device const T* x [[buffer(0)]],                 \
      device const float* weight [[buffer(1)]],    \
      device const float* bias [[buffer(2)]],      \
      device const int* seq_idx [[buffer(3)]],     \
      device const float* init [[buffer(4)]],      \
      device const T* dout [[buffer(5)]],          \
      device const float* dfinal [[buffer(6)]]

#define CC_CTX() cc_make_ctx<T>(x, weight, bias, seq_idx, init, dout, dfinal, p)

// out = act(bias + conv(xe)), out has x's strides.
template <typename T, int W>
[[kernel]] void causal_conv1d_fwd(
    CC_INPUT_ARGS,
    device T* out [[buffer(7)]],
    constant long* p [[buffer(8)]],
    uint tid [[thread_position_in_grid]]) {
  long b, d, t0, t1;
  if (!cc_thread_run(p, tid, b, d, t0, t1)) {
    return;
  }
  const CausalConvCtx<T> c = CC_CTX();
  cc_forward_run<T, W>(c, out, b, d, t0, t1);
}

// dx (x's strides; dfinal flows into the last W-1 positions) and the partial
// dweight/dbias rows, float32 (B * run_groups, D, W+1). CONV_CHANNELS =
// channels per threadgroup, CONV_RUN_GROUPS = run groups per row.
template <typename T, int W>
[[max_total_threads_per_threadgroup(CC_GROUP)]] kernel void
causal_conv1d_bwd(
    CC_INPUT_ARGS,
    device T* dx [[buffer(7)]],
    device float* part [[buffer(8)]],
    constant long* p [[buffer(9)]],
    uint tid [[thread_position_in_grid]]) {
  threadgroup float red[CC_GROUP];
  const CausalConvCtx<T> c = CC_CTX();
  const bool d_fastest = p[CONV_CHANNEL_LAST] != 0;
  const uint gd = uint(p[CONV_CHANNELS]);
  long b, d, t0, t1, row;
  uint lid;
  cc_group_tile(
      tid, c.D, c.len, p[CONV_RUN], p[CONV_RUNS], gd, p[CONV_RUN_GROUPS],
      d_fastest, b, d, t0, t1, row, lid);
  cc_backward_group<T, W>(
      c, dx, part, red, b, d, t0, t1, row, lid, gd, d_fastest);
}

// dinitial_states, float32 (B, D, W-1): one thread per element.
template <typename T, int W>
[[kernel]] void causal_conv1d_bwd_dinit(
    CC_INPUT_ARGS,
    device float* out [[buffer(7)]],
    constant long* p [[buffer(8)]],
    uint tid [[thread_position_in_grid]]) {
  const CausalConvCtx<T> c = CC_CTX();
  const long hist = c.width - 1;
  const long i = long(tid);
  if (i >= p[CONV_N_STATES] * c.D * hist) {
    return;
  }
  const long j = i % hist;
  const long d = (i / hist) % c.D;
  const long n = i / (hist * c.D);
  out[i] = cc_state_grad<W>(c, n, d, j);
}

CC_INSTANTIATE_TYPES(causal_conv1d_fwd, CC_INSTANTIATE_WIDTHS)
CC_INSTANTIATE_TYPES(causal_conv1d_bwd, CC_INSTANTIATE_WIDTHS)
CC_INSTANTIATE_TYPES(causal_conv1d_bwd_dinit, CC_INSTANTIATE_ANY)
