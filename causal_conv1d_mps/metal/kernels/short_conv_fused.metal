// short_conv_fused on x (B, T, D) with any strides over B and T (stride over
// D is 1): out = (x if residual else 0) + act(bias + conv(x * mask)), with
// packed sequences (cu_seqlens, B == 1) convolved independently. Threads run
// along D (consecutive channels = consecutive addresses); each thread owns a
// run of consecutive t and keeps the W-1 halo in registers.
//
// Every kernel here takes the same input buffers, in this order:
//   0 x (storage T)  1 weight (D, W) f32  2 bias (D) f32  3 mask (B, T) f32
//   4 cu_seqlens (N+1) i32  5 initial states (N, D, W-1) f32
//   6 dout (B, T, D) contiguous, storage T  7 dfinal states (N, D, W-1) f32
//   8.. the kernel's outputs, then params
// Absent optional inputs are bound to a one-element stand-in, never read.
// Params: the int64 slots FUSED_* of the generated contract header.

template <typename T>
struct FusedConvCtx {
  device const T* x;
  device const float* w;
  device const float* b_ptr;
  device const float* mask;
  device const int* cu;
  device const float* init;
  device const T* go;
  device const float* dfin;
  long B, D, len, width, n_seq;
  long xsb, xst;
  long activation;  // a CC_ACTIVATION_* code
  bool has_bias, has_mask, has_cu, has_init, residual, has_dfinal;

  float weight(long d, int k) const {
    return w[d * width + k];
  }
  float bias(long d) const {
    return has_bias ? b_ptr[d] : 0.0f;
  }
  // The packed sequence n with cu[n] <= t < cu[n+1]: a binary search for the
  // last boundary <= t (empty sequences are skipped by construction). No host
  // synchronisation: cu_seqlens stays on the device.
  Seg seg_first(long b, long t) const {
    Seg s;
    if (!has_cu) {
      s.id = b;
      s.start = 0;
      return s;
    }
    long lo = 0;
    long hi = n_seq;  // invariant: cu[lo] <= t < cu[hi]
    while (hi - lo > 1) {
      const long mid = (lo + hi) / 2;
      if (long(cu[mid]) <= t) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    s.id = lo;
    s.start = cu[lo];
    return s;
  }
  Seg seg_next(long b, long t, Seg prev) const {
    if (!has_cu) {
      return prev;
    }
    Seg s = prev;
    // Bounded by n_seq: cu_seqlens not ending at T (unchecked on GPUs)
    // must not walk the search past its last entry.
    while (s.id + 1 < n_seq && long(cu[s.id + 1]) <= t) {
      s.id += 1;
    }
    s.start = cu[s.id];
    return s;
  }
  bool silent(Seg s) const {
    return false;
  }
  // The extended input seen from segment s: masked x from the sequence start
  // on, that sequence's initial states (unmasked) before it.
  // A mask value of exactly 0 selects 0 (x there may be NaN: NaN * 0 = NaN).
  float masked(long b, long t, float v) const {
    if (!has_mask) {
      return v;
    }
    const float m = mask[b * len + t];
    return m == 0.0f ? 0.0f : v * m;
  }
  // Every position a segment reads is its own (its x or its states).
  bool live(long b, long p, Seg s) const {
    return true;
  }
  float tap(long b, long d, long p, Seg s) const {
    if (p >= s.start) {
      return masked(b, p, static_cast<float>(x[b * xsb + p * xst + d]));
    }
    return has_init
        ? init[(s.id * D + d) * (width - 1) + (width - 1) + (p - s.start)]
        : 0.0f;
  }
  float dout(long b, long d, long t) const {
    return static_cast<float>(go[(b * len + t) * D + d]);
  }
  float dfinal(long n, long d, long f) const {
    return dfin[(n * D + d) * (width - 1) + f];
  }
  long out_index(long b, long d, long t) const {
    return (b * len + t) * D + d;
  }
  long seg_end(Seg s) const {
    return has_cu ? long(cu[s.id + 1]) : len;
  }
  float finish(long b, long d, long t, float pre, Seg s) const {
    float y = cc_activation(activation, pre);
    if (residual) {
      y += static_cast<float>(x[b * xsb + t * xst + d]);
    }
    return y;
  }
  // d(x*m)/dx = m; the residual adds dout unmasked.
  float finish_dx(long b, long d, long q, float acc, Seg s) const {
    const long f = q - (seg_end(s) - (width - 1));
    if (has_dfinal && f >= 0) {
      acc += dfinal(s.id, d, f);
    }
    acc = masked(b, q, acc);
    if (residual) {
      acc += dout(b, d, q);
    }
    return acc;
  }
  long state_batch(long n) const {
    return has_cu ? 0 : n;
  }
  long state_start(long n) const {
    return has_cu ? long(cu[n]) : 0;
  }
  long state_end(long n) const {
    return has_cu ? long(cu[n + 1]) : len;
  }
  Seg state_seg(long n) const {
    Seg s;
    s.id = n;
    s.start = state_start(n);
    return s;
  }
};

template <typename T>
inline FusedConvCtx<T> fused_make_ctx(
    device const T* x,
    device const float* weight,
    device const float* bias,
    device const float* mask,
    device const int* cu_seqlens,
    device const float* init,
    device const T* dout,
    device const float* dfinal,
    constant long* p) {
  FusedConvCtx<T> c;
  c.x = x;
  c.w = weight;
  c.b_ptr = bias;
  c.mask = mask;
  c.cu = cu_seqlens;
  c.init = init;
  c.go = dout;
  c.dfin = dfinal;
  c.B = p[FUSED_B];
  c.D = p[FUSED_D];
  c.len = p[FUSED_T];
  c.width = p[FUSED_W];
  c.xsb = p[FUSED_X_STRIDE_B];
  c.xst = p[FUSED_X_STRIDE_T];
  c.activation = p[FUSED_ACTIVATION];
  const long flags = p[FUSED_FLAGS];
  c.n_seq = p[FUSED_N_STATES];
  c.has_bias = (flags & CC_HAS_BIAS) != 0;
  c.has_mask = (flags & CC_HAS_MASK) != 0;
  c.has_cu = (flags & CC_HAS_CU) != 0;
  c.has_init = (flags & CC_HAS_INIT) != 0;
  c.residual = (flags & CC_RESIDUAL) != 0;
  c.has_dfinal = (flags & CC_HAS_DFINAL) != 0;
  return c;
}

// Channels fastest: thread -> (d, run, b).
inline bool fused_thread_run(
    constant long* p, uint tid, thread long& b, thread long& d, thread long& t0,
    thread long& t1) {
  const long D = p[FUSED_D];
  const long len = p[FUSED_T];
  const long run = p[FUSED_RUN];
  const long runs = p[FUSED_RUNS];
  long i = long(tid);
  d = i % D;
  i /= D;
  const long r = i % runs;
  b = i / runs;
  t0 = r * run;
  t1 = t0 + run < len ? t0 + run : len;
  return b < p[FUSED_B];
}

// Buffers 0..7, shared by every kernel of this file.
#define FUSED_INPUT_ARGS                           \
  device const T* x [[buffer(0)]],                 \
      device const float* weight [[buffer(1)]],    \
      device const float* bias [[buffer(2)]],      \
      device const float* mask [[buffer(3)]],      \
      device const int* cu_seqlens [[buffer(4)]],  \
      device const float* init [[buffer(5)]],      \
      device const T* dout [[buffer(6)]],          \
      device const float* dfinal [[buffer(7)]]

#define FUSED_CTX() \
  fused_make_ctx<T>(x, weight, bias, mask, cu_seqlens, init, dout, dfinal, p)

// out (B, T, D) contiguous.
template <typename T, int W>
[[kernel]] void short_conv_fused_fwd(
    FUSED_INPUT_ARGS,
    device T* out [[buffer(8)]],
    constant long* p [[buffer(9)]],
    uint tid [[thread_position_in_grid]]) {
  long b, d, t0, t1;
  if (!fused_thread_run(p, tid, b, d, t0, t1)) {
    return;
  }
  const FusedConvCtx<T> c = FUSED_CTX();
  cc_forward_run<T, W>(c, out, b, d, t0, t1);
}

// dx (B, T, D) contiguous and the partial dweight/dbias rows, float32
// (B * run_groups, D, W+1); threadgroup tiles with channels fastest.
template <typename T, int W>
[[max_total_threads_per_threadgroup(CC_GROUP)]] kernel void
short_conv_fused_bwd(
    FUSED_INPUT_ARGS,
    device T* dx [[buffer(8)]],
    device float* part [[buffer(9)]],
    constant long* p [[buffer(10)]],
    uint tid [[thread_position_in_grid]]) {
  threadgroup float red[CC_GROUP];
  const FusedConvCtx<T> c = FUSED_CTX();
  const uint gd = uint(p[FUSED_CHANNELS]);
  long b, d, t0, t1, row;
  uint lid;
  cc_group_tile(
      tid, c.D, c.len, p[FUSED_RUN], p[FUSED_RUNS], gd, p[FUSED_RUN_GROUPS],
      true, b, d, t0, t1, row, lid);
  cc_backward_group<T, W>(c, dx, part, red, b, d, t0, t1, row, lid, gd, true);
}

// dinitial_states, float32 (N, D, W-1): one thread per element.
template <typename T, int W>
[[kernel]] void short_conv_fused_bwd_dinit(
    FUSED_INPUT_ARGS,
    device float* out [[buffer(8)]],
    constant long* p [[buffer(9)]],
    uint tid [[thread_position_in_grid]]) {
  const FusedConvCtx<T> c = FUSED_CTX();
  const long hist = c.width - 1;
  const long i = long(tid);
  if (i >= c.n_seq * c.D * hist) {
    return;
  }
  const long j = i % hist;
  const long d = (i / hist) % c.D;
  const long n = i / (hist * c.D);
  out[i] = cc_state_grad<W>(c, n, d, j);
}

CC_INSTANTIATE_TYPES(short_conv_fused_fwd, CC_INSTANTIATE_WIDTHS)
CC_INSTANTIATE_TYPES(short_conv_fused_bwd, CC_INSTANTIATE_WIDTHS)
CC_INSTANTIATE_TYPES(short_conv_fused_bwd_dinit, CC_INSTANTIATE_ANY)
