// Shared device code for every causal-conv1d kernel. The loader places this
// file first; the op files define a "context" struct (how to read the extended
// input of one op) and entry kernels that call the generic bodies below.
//
// Numerics: values are loaded in their storage type (float, half, bfloat),
// converted to float (the opmath type), accumulated in float and converted
// once on store. Weights, bias and initial states arrive as float32 (the
// launcher converts these small (D, W) / (D,) / (B, D, W-1) tensors once).
//
// Width: kernels are templated over the width W. W in 1..16 gives unrolled
// loops and register windows; W == 0 is the generic variant that reads the
// runtime width from the context (correct for any width).

#include <metal_stdlib>
using namespace metal;

// Flags packed into one launcher integer (runtime flags: uniform branches).
#define CC_HAS_BIAS 1
#define CC_HAS_SEQ 2
#define CC_HAS_INIT 4
#define CC_SILU 8
#define CC_HAS_DFINAL 16
#define CC_HAS_MASK 32
#define CC_HAS_CU 64
#define CC_RESIDUAL 128
#define CC_CIRCULAR 256
#define CC_HAS_INDICES 512

// Threads per threadgroup of the kernels that reduce in threadgroup memory.
#define CC_GROUP 256

inline float cc_sigmoid(float v) {
  return 1.0f / (1.0f + exp(-v));
}

inline float cc_silu(float v) {
  return v * cc_sigmoid(v);
}

// d silu(v) / dv = s * (1 + v * (1 - s)), s = sigmoid(v).
inline float cc_silu_grad(float v) {
  float s = cc_sigmoid(v);
  return s * (1.0f + v * (1.0f - s));
}

// Positive remainder, for circular buffers indexed by possibly negative values.
inline long cc_mod(long a, long n) {
  long r = a % n;
  return r < 0 ? r + n : r;
}

// The segment an output position belongs to: taps are only taken from
// positions of the same segment. `id` is the seq_idx value (causal_conv1d) or
// the packed-sequence number (short_conv_fused); `start` is where that
// segment's input begins (positions before it come from initial states).
struct Seg {
  long id;
  long start;
};

// ---------------------------------------------------------------------------
// Forward: one thread computes outputs t0 .. t1-1 of one (b, d) row.
// Fixed W: the last W inputs live in a register window, so each input is
// loaded once per run (plus a W-1 halo at the start of the run).
// Generic W: every tap is read from memory (cache-resident after first use).
// ---------------------------------------------------------------------------
template <typename T, int W, class Ctx>
inline void cc_forward_run(
    thread const Ctx& c, device T* out, long b, long d, long t0, long t1) {
  const float bias = c.bias(d);
  if (W > 0) {
    constexpr int WN = W > 0 ? W : 1;  // W, for the array bounds of this branch
    float wr[WN];
    float win[WN];
    for (int k = 0; k < WN; ++k) {
      wr[k] = c.weight(d, k);
    }
    Seg seg = c.seg_first(b, t0);
    for (int j = 0; j < WN - 1; ++j) {
      win[j] = c.tap(b, d, t0 - (WN - 1) + j, seg);
    }
    for (long t = t0; t < t1; ++t) {
      if (t != t0) {
        Seg next = c.seg_next(b, t, seg);
        if (next.id != seg.id) {
          // A new segment starts at t: its history differs, reload it.
          seg = next;
          for (int j = 0; j < WN - 1; ++j) {
            win[j] = c.tap(b, d, t - (WN - 1) + j, seg);
          }
        }
      }
      win[WN - 1] = c.tap(b, d, t, seg);
      float acc = bias;
      for (int k = 0; k < WN; ++k) {
        acc = fma(wr[k], win[k], acc);
      }
      out[c.out_index(b, d, t)] = static_cast<T>(c.finish(b, d, t, acc, seg));
      for (int j = 0; j < WN - 1; ++j) {
        win[j] = win[j + 1];
      }
    }
  } else {
    const int w = int(c.width);
    Seg seg = c.seg_first(b, t0);
    for (long t = t0; t < t1; ++t) {
      if (t != t0) {
        seg = c.seg_next(b, t, seg);
      }
      float acc = bias;
      for (int k = 0; k < w; ++k) {
        acc = fma(c.weight(d, k), c.tap(b, d, t - (w - 1) + k, seg), acc);
      }
      out[c.out_index(b, d, t)] = static_cast<T>(c.finish(b, d, t, acc, seg));
    }
  }
}

// Gradient with respect to the pre-activation at t (0 outside [0, len) and
// where the output is forced to 0). SiLU recomputes the pre-activation.
template <int W, class Ctx>
inline float cc_grad_pre(thread const Ctx& c, long b, long d, long t, Seg seg) {
  if (t >= c.len || c.silent(seg)) {
    return 0.0f;
  }
  const float go = c.dout(b, d, t);
  if (!c.silu) {
    return go;
  }
  const int w = W > 0 ? W : int(c.width);
  float pre = c.bias(d);
  for (int k = 0; k < w; ++k) {
    pre = fma(c.weight(d, k), c.tap(b, d, t - (w - 1) + k, seg), pre);
  }
  return go * cc_silu_grad(pre);
}

// ---------------------------------------------------------------------------
// Backward, input gradient: a causal convolution with flipped taps that reads
// the pre-activation gradient g ahead in time:
//   dxe[q] = sum_k w[k] * g[q + W-1-k]   (only where q and q+W-1-k share a segment)
// Fixed W: g for t = q .. q+W-1 lives in a register window (each g computed
// once per run). Generic W: each g is recomputed per tap.
// ---------------------------------------------------------------------------
template <typename T, int W, class Ctx>
inline void cc_input_grad_run(
    thread const Ctx& c, device T* dx, long b, long d, long q0, long q1) {
  if (W > 0) {
    constexpr int WN = W > 0 ? W : 1;  // W, for the array bounds of this branch
    float wr[WN];
    float gw[WN];
    long gid[WN];
    for (int k = 0; k < WN; ++k) {
      wr[k] = c.weight(d, k);
    }
    Seg sq = c.seg_first(b, q0);
    Seg st = sq;  // segment of the newest t in the window
    for (int j = 0; j < WN - 1; ++j) {
      const long t = q0 + j;
      if (t < c.len && j > 0) {
        st = c.seg_next(b, t, st);
      }
      gw[j] = cc_grad_pre<W>(c, b, d, t, st);
      gid[j] = st.id;
    }
    for (long q = q0; q < q1; ++q) {
      const long t = q + WN - 1;
      if (t < c.len && t > q0) {
        st = c.seg_next(b, t, st);
      }
      gw[WN - 1] = cc_grad_pre<W>(c, b, d, t, st);
      gid[WN - 1] = st.id;
      if (q != q0) {
        sq = c.seg_next(b, q, sq);
      }
      float acc = 0.0f;
      for (int k = 0; k < WN; ++k) {
        const int j = WN - 1 - k;
        if (gid[j] == sq.id) {
          acc = fma(wr[k], gw[j], acc);
        }
      }
      dx[c.out_index(b, d, q)] = static_cast<T>(c.finish_dx(b, d, q, acc, sq));
      for (int j = 0; j < WN - 1; ++j) {
        gw[j] = gw[j + 1];
        gid[j] = gid[j + 1];
      }
    }
  } else {
    const int w = int(c.width);
    Seg sq = c.seg_first(b, q0);
    for (long q = q0; q < q1; ++q) {
      if (q != q0) {
        sq = c.seg_next(b, q, sq);
      }
      float acc = 0.0f;
      for (int k = 0; k < w; ++k) {
        const long t = q + (w - 1) - k;
        if (t < c.len) {
          const Seg st = c.seg_first(b, t);
          if (st.id == sq.id) {
            acc = fma(c.weight(d, k), cc_grad_pre<W>(c, b, d, t, st), acc);
          }
        }
      }
      dx[c.out_index(b, d, q)] = static_cast<T>(c.finish_dx(b, d, q, acc, sq));
    }
  }
}

// Backward, initial-state gradient of one state row n, column j (position
// q = start - (W-1) + j of that row's stream). A small kernel: direct reads.
template <int W, class Ctx>
inline float cc_state_grad(thread const Ctx& c, long n, long d, long j) {
  const int w = W > 0 ? W : int(c.width);
  const long b = c.state_batch(n);
  const long start = c.state_start(n);
  const long end = c.state_end(n);
  const Seg own = c.state_seg(n);
  const long q = start - (w - 1) + j;
  float acc = 0.0f;
  for (int k = 0; k < w; ++k) {
    const long t = q + (w - 1) - k;
    if (t >= start && t < end) {
      const Seg st = c.seg_first(b, t);
      if (st.id == own.id) {
        acc = fma(c.weight(d, k), cc_grad_pre<W>(c, b, d, t, st), acc);
      }
    }
  }
  // The final states are the last W-1 stream positions; a sequence shorter
  // than W-1 passes part of its initial states straight through.
  const long f = q - (end - (w - 1));
  if (c.has_dfinal && f >= 0) {
    acc += c.dfinal(n, d, f);
  }
  return acc;
}

// ---------------------------------------------------------------------------
// Backward, weight and bias gradients. Each thread accumulates
//   dw[k] += g[t] * xe[t - (W-1) + k],  db += g[t]
// over its run in registers, KC taps at a time (all W+1 at once for fixed W;
// chunks of 8 for the generic width, recomputing g per chunk). The threads of
// one threadgroup that share a channel are then summed in a fixed order and
// the group writes one float32 partial row; a second kernel adds the rows in
// a fixed order, so the result is bitwise reproducible (no atomics).
//
// Threadgroup = CC_GROUP threads = `gd` channels x `gr` runs; lid -> (dl, rl).
// ---------------------------------------------------------------------------
template <int W, class Ctx>
inline void cc_weight_grad_group(
    thread const Ctx& c,
    device float* part,
    threadgroup float* red,
    long b,
    long d,
    bool d_valid,
    long t0,
    long t1,
    long row,
    uint lid,
    uint gd,
    bool d_fastest) {
  const int w = W > 0 ? W : int(c.width);
  const int KC = W > 0 ? W + 1 : 8;
  const uint gr = CC_GROUP / gd;
  const uint dl = d_fastest ? lid % gd : lid / gr;
  const uint rl = d_fastest ? lid / gd : lid % gr;
  for (int k0 = 0; k0 < w + 1; k0 += KC) {
    float pw[W > 0 ? W + 1 : 8];
    for (int kk = 0; kk < KC; ++kk) {
      pw[kk] = 0.0f;
    }
    if (d_valid && t0 < t1) {
      Seg seg = c.seg_first(b, t0);
      for (long t = t0; t < t1; ++t) {
        if (t != t0) {
          seg = c.seg_next(b, t, seg);
        }
        const float g = cc_grad_pre<W>(c, b, d, t, seg);
        for (int kk = 0; kk < KC; ++kk) {
          const int k = k0 + kk;
          if (k < w) {
            pw[kk] = fma(g, c.tap(b, d, t - (w - 1) + k, seg), pw[kk]);
          } else if (k == w) {
            pw[kk] += g;
          }
        }
      }
    }
    // Fixed-order sum over the gr runs of each channel in this group.
    for (int kk = 0; kk < KC; ++kk) {
      red[lid] = pw[kk];
      threadgroup_barrier(mem_flags::mem_threadgroup);
      const int k = k0 + kk;
      if (rl == 0 && d_valid && k <= w) {
        float s = 0.0f;
        for (uint r = 0; r < gr; ++r) {
          s += red[d_fastest ? r * gd + dl : dl * gr + r];
        }
        part[(row * c.D + d) * (w + 1) + k] = s;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
  }
}

// One MLX-style instantiation per (kernel, storage type, width): the host name
// is mechanical, e.g. causal_conv1d_fwd_bfloat_w4, causal_conv1d_fwd_half_wany.
// The name is pasted into one token and stringified once, so host_name gets a
// single literal (no reliance on literal concatenation inside the attribute).
#define CC_STR(x) #x
#define CC_NAME(x) CC_STR(x)
#define CC_INSTANTIATE(FN, TNAME, T, W, WNAME)                       \
  template [[host_name(CC_NAME(FN##_##TNAME##_w##WNAME))]] [[kernel]] \
  decltype(FN<T, W>) FN<T, W>;

#define CC_INSTANTIATE_WIDTHS(FN, TNAME, T) \
  CC_INSTANTIATE(FN, TNAME, T, 0, any)      \
  CC_INSTANTIATE(FN, TNAME, T, 1, 1)        \
  CC_INSTANTIATE(FN, TNAME, T, 2, 2)        \
  CC_INSTANTIATE(FN, TNAME, T, 3, 3)        \
  CC_INSTANTIATE(FN, TNAME, T, 4, 4)        \
  CC_INSTANTIATE(FN, TNAME, T, 5, 5)        \
  CC_INSTANTIATE(FN, TNAME, T, 6, 6)        \
  CC_INSTANTIATE(FN, TNAME, T, 7, 7)        \
  CC_INSTANTIATE(FN, TNAME, T, 8, 8)        \
  CC_INSTANTIATE(FN, TNAME, T, 9, 9)        \
  CC_INSTANTIATE(FN, TNAME, T, 10, 10)      \
  CC_INSTANTIATE(FN, TNAME, T, 11, 11)      \
  CC_INSTANTIATE(FN, TNAME, T, 12, 12)      \
  CC_INSTANTIATE(FN, TNAME, T, 13, 13)      \
  CC_INSTANTIATE(FN, TNAME, T, 14, 14)      \
  CC_INSTANTIATE(FN, TNAME, T, 15, 15)      \
  CC_INSTANTIATE(FN, TNAME, T, 16, 16)

// bfloat exists from Metal 3.1 (macOS 14); older compilers skip those kernels
// and the launcher reports bfloat16 as unsupported there.
#if defined(__HAVE_BFLOAT__)
#define CC_INSTANTIATE_BFLOAT(FN, W_MACRO) W_MACRO(FN, bfloat, bfloat)
#else
#define CC_INSTANTIATE_BFLOAT(FN, W_MACRO)
#endif

// Every storage type, every width (W_MACRO = CC_INSTANTIATE_WIDTHS), or
// every storage type with one generic body (W_MACRO = CC_INSTANTIATE_ANY).
#define CC_INSTANTIATE_ANY(FN, TNAME, T) CC_INSTANTIATE(FN, TNAME, T, 0, any)

// Kernels templated over the storage type only: name_float, name_half, ...
#define CC_INSTANTIATE_T(FN, TNAME, T)                        \
  template [[host_name(CC_NAME(FN##_##TNAME))]] [[kernel]] \
  decltype(FN<T>) FN<T>;

#define CC_INSTANTIATE_TYPES(FN, W_MACRO) \
  W_MACRO(FN, float, float)               \
  W_MACRO(FN, half, half)                 \
  CC_INSTANTIATE_BFLOAT(FN, W_MACRO)
