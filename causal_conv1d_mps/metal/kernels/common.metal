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

// The flag bits CC_*, CC_GROUP (threads per threadgroup of the kernels that
// reduce in threadgroup memory) and the parameter slot names (CONV_T, ...)
// come from the generated contract header the loader places before this file
// (causal_conv1d_mps/metal/_contract.py): never write their values here.

inline float cc_sigmoid(float v) {
  return 1.0f / (1.0f + exp(-v));
}

// The activation `code` (the ACTIVATION parameter slot: a CC_ACTIVATION_*
// code of the registry causal_conv1d_mps/_activation.py) of the
// pre-activation v. The code is the same for every thread of a launch, so
// the switch never diverges.
inline float cc_activation(long code, float v) {
  switch (code) {
    case CC_ACTIVATION_SILU:
      return v * cc_sigmoid(v);
    default:  // CC_ACTIVATION_IDENTITY
      return v;
  }
}

// d cc_activation(code, v) / dv. The backward skips it, and the
// recomputation of the pre-activation, for CC_ACTIVATION_IDENTITY.
inline float cc_activation_grad(long code, float v) {
  switch (code) {
    case CC_ACTIVATION_SILU: {
      // s * (1 + v * (1 - s)), s = sigmoid(v)
      const float s = cc_sigmoid(v);
      return s * (1.0f + v * (1.0f - s));
    }
    default:  // CC_ACTIVATION_IDENTITY
      return 1.0f;
  }
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

// What the bodies below ask of a context `c` (CausalConvCtx, FusedConvCtx):
//   sizes and flags: c.D, c.len, c.width, c.activation, c.has_dfinal
//   c.weight(d, k), c.bias(d)                    float32 parameters
//   c.seg_first(b, t), c.seg_next(b, t, prev)    segment of t (next: t grows)
//   c.silent(seg)                                output forced to 0 there
//   c.tap(b, d, p, seg)                          extended input at p, seen from seg
//   c.live(b, p, seg)                            whether that tap exists (same sequence)
//   c.dout(b, d, t), c.dfinal(n, d, f)           incoming gradients
//   c.out_index(b, d, t)                         where out / dx is stored
//   c.finish(b, d, t, pre, seg)                  output from the pre-activation
//   c.finish_dx(b, d, q, acc, seg)               dx from sum_k w[k] g[q+W-1-k]
//   c.state_batch/start/end/seg(n)               the stream of state row n

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
// where the output is forced to 0). An activation other than the identity
// recomputes the pre-activation.
template <int W, class Ctx>
inline float cc_grad_pre(thread const Ctx& c, long b, long d, long t, Seg seg) {
  if (t >= c.len || c.silent(seg)) {
    return 0.0f;
  }
  const float go = c.dout(b, d, t);
  if (c.activation == CC_ACTIVATION_IDENTITY) {
    return go;
  }
  const int w = W > 0 ? W : int(c.width);
  float pre = c.bias(d);
  for (int k = 0; k < w; ++k) {
    pre = fma(c.weight(d, k), c.tap(b, d, t - (w - 1) + k, seg), pre);
  }
  return go * cc_activation_grad(c.activation, pre);
}

// ---------------------------------------------------------------------------
// Backward. With g[t] = dL/dpre[t] (cc_grad_pre):
//   input:  dxe[q] = sum_k w[k] * g[q + W-1-k]   (a causal convolution with
//           flipped taps reading g ahead in time; only where q and
//           q+W-1-k share a segment)
//   weight: dw[k] = sum_t g[t] * xe[t - (W-1) + k],   bias: db = sum_t g[t]
// One thread owns a run [t0, t1) of one channel: it writes dx there and
// accumulates its weight/bias partial sums over the same t. Threadgroups of
// CC_GROUP threads = `gd` channels x `gr` runs then add the partials of each
// channel in a fixed order (cc_group_sum) and write one float32 row each; a
// second kernel adds the rows in a fixed order, so the result is bitwise
// reproducible (no atomics).
// ---------------------------------------------------------------------------

// Fixed W: one pass over x and dout. t walks [t0, t1 + W-1); the inputs of
// the W taps of t live in a register window (as in the forward), g for the W
// times ahead of q = t - (W-1) in a second one, so each x and dout value is
// loaded once per run (plus halos) and each g is computed once.
template <typename T, int W, class Ctx>
inline void cc_backward_run(
    thread const Ctx& c,
    device T* dx,
    long b,
    long d,
    long t0,
    long t1,
    thread float* pw) {
  constexpr int WN = W > 0 ? W : 1;  // W; the generic width does not use this
  for (int k = 0; k <= WN; ++k) {
    pw[k] = 0.0f;
  }
  if (t0 >= t1) {
    return;
  }
  float wr[WN];
  float xw[WN];
  bool xl[WN];  // whether tap k of t exists: a tap of another sequence adds
                // nothing to dweight (g * 0 would carry a NaN of g across)
  float gw[WN];
  long gid[WN];
  for (int k = 0; k < WN; ++k) {
    wr[k] = c.weight(d, k);
    xl[k] = false;
    gw[k] = 0.0f;
    gid[k] = 0;
  }
  const float bias = c.bias(d);
  Seg st = c.seg_first(b, t0);  // segment of t
  Seg sq = st;                  // segment of q = t - (W-1)
  for (int j = 0; j < WN - 1; ++j) {
    xw[j] = c.tap(b, d, t0 - (WN - 1) + j, st);
    xl[j] = c.live(b, t0 - (WN - 1) + j, st);
  }
  for (long t = t0; t < t1 + WN - 1; ++t) {
    float g = 0.0f;
    if (t < c.len) {
      if (t != t0) {
        Seg next = c.seg_next(b, t, st);
        if (next.id != st.id) {
          st = next;
          for (int j = 0; j < WN - 1; ++j) {
            xw[j] = c.tap(b, d, t - (WN - 1) + j, st);
            xl[j] = c.live(b, t - (WN - 1) + j, st);
          }
        }
      }
      xw[WN - 1] = c.tap(b, d, t, st);
      xl[WN - 1] = true;
      // A silent (padding) position is skipped, not multiplied by 0: its
      // dout and inputs may hold NaN and must not reach any gradient.
      if (!c.silent(st)) {
        g = c.dout(b, d, t);
        if (c.activation != CC_ACTIVATION_IDENTITY) {
          float pre = bias;
          for (int k = 0; k < WN; ++k) {
            pre = fma(wr[k], xw[k], pre);
          }
          g *= cc_activation_grad(c.activation, pre);
        }
        if (t < t1) {
          for (int k = 0; k < WN; ++k) {
            if (xl[k]) {
              pw[k] = fma(g, xw[k], pw[k]);
            }
          }
          pw[WN] += g;
        }
      }
    }
    for (int j = 0; j < WN - 1; ++j) {
      gw[j] = gw[j + 1];
      gid[j] = gid[j + 1];
      xw[j] = xw[j + 1];
      xl[j] = xl[j + 1];
    }
    gw[WN - 1] = g;
    gid[WN - 1] = st.id;
    const long q = t - (WN - 1);
    if (q >= t0) {
      if (q != t0) {
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
    }
  }
}

// Generic width, input gradient: every g is recomputed per tap (direct reads).
template <typename T, class Ctx>
inline void cc_input_grad_generic(
    thread const Ctx& c, device T* dx, long b, long d, long q0, long q1) {
  if (q0 >= q1) {
    return;
  }
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
          acc = fma(c.weight(d, k), cc_grad_pre<0>(c, b, d, t, st), acc);
        }
      }
    }
    dx[c.out_index(b, d, q)] = static_cast<T>(c.finish_dx(b, d, q, acc, sq));
  }
}

// Writes, for each of the `count` partial sums pw[i] (columns k0 + i of the
// (rows, D, ncols) partial buffer), the sum over the gr runs of each channel
// of this threadgroup, added in run order. Every thread of the group calls it
// (it contains barriers). lid -> (dl, rl) as in the kernels.
inline void cc_group_sum(
    device float* part,
    threadgroup float* red,
    thread const float* pw,
    int count,
    int k0,
    int ncols,
    long row,
    long D,
    long d,
    bool d_valid,
    uint lid,
    uint gd,
    bool d_fastest) {
  const uint gr = CC_GROUP / gd;
  const uint dl = d_fastest ? lid % gd : lid / gr;
  const uint rl = d_fastest ? lid / gd : lid % gr;
  for (int i = 0; i < count; ++i) {
    red[lid] = pw[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (rl == 0 && d_valid && k0 + i < ncols) {
      float s = 0.0f;
      for (uint r = 0; r < gr; ++r) {
        s += red[d_fastest ? r * gd + dl : dl * gr + r];
      }
      part[(row * D + d) * ncols + k0 + i] = s;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// Generic width, weight and bias partials: 8 taps at a time in registers,
// recomputing g for each chunk of taps.
template <class Ctx>
inline void cc_weight_grad_generic(
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
  const int w = int(c.width);
  for (int k0 = 0; k0 < w + 1; k0 += 8) {
    float pw[8];
    for (int kk = 0; kk < 8; ++kk) {
      pw[kk] = 0.0f;
    }
    if (d_valid && t0 < t1) {
      Seg seg = c.seg_first(b, t0);
      for (long t = t0; t < t1; ++t) {
        if (t != t0) {
          seg = c.seg_next(b, t, seg);
        }
        if (c.silent(seg)) {
          continue;  // padding: skipped (its inputs may be NaN), not scaled by 0
        }
        const float g = cc_grad_pre<0>(c, b, d, t, seg);
        for (int kk = 0; kk < 8; ++kk) {
          const int k = k0 + kk;
          if (k < w) {
            const long p = t - (w - 1) + k;
            if (c.live(b, p, seg)) {
              pw[kk] = fma(g, c.tap(b, d, p, seg), pw[kk]);
            }
          } else if (k == w) {
            pw[kk] += g;
          }
        }
      }
    }
    cc_group_sum(part, red, pw, 8, k0, w + 1, row, c.D, d, d_valid, lid, gd, d_fastest);
  }
}

// Thread -> (b, d, run) of the backward's threadgroup tiles: groups are
// (batch row, gd channels, gr = CC_GROUP / gd runs), ordered run group
// fastest; inside a group, channels are the fastest index when d_fastest.
// row = this group's row of the partial buffer (b * run_groups + run group).
inline void cc_group_tile(
    uint tid, long D, long len, long run, long runs, uint gd, long run_groups,
    bool d_fastest, thread long& b, thread long& d, thread long& t0,
    thread long& t1, thread long& row, thread uint& lid) {
  const uint gr = CC_GROUP / gd;
  lid = tid % CC_GROUP;
  long g = long(tid / CC_GROUP);
  const long rg = g % run_groups;
  g /= run_groups;
  const long d_groups = (D + gd - 1) / gd;
  const long dg = g % d_groups;
  b = g / d_groups;
  const uint dl = d_fastest ? lid % gd : lid / gr;
  const uint rl = d_fastest ? lid / gd : lid % gr;
  d = dg * gd + dl;
  const long r = rg * gr + rl;
  t0 = r * run;
  t1 = r < runs ? (t0 + run < len ? t0 + run : len) : t0;
  row = b * run_groups + rg;
}

// The whole backward of one thread's run, then the group's partial row:
// the fixed-width single pass, or the generic two-part path.
template <typename T, int W, class Ctx>
inline void cc_backward_group(
    thread const Ctx& c,
    device T* dx,
    device float* part,
    threadgroup float* red,
    long b,
    long d,
    long t0,
    long t1,
    long row,
    uint lid,
    uint gd,
    bool d_fastest) {
  const bool d_valid = d < c.D;
  if (W > 0) {
    float pw[W > 0 ? W + 1 : 2];  // W + 1 (the bound is for the unused W == 0 instantiation)
    if (d_valid) {
      cc_backward_run<T, W>(c, dx, b, d, t0, t1, pw);
    } else {
      for (int k = 0; k <= W; ++k) {
        pw[k] = 0.0f;
      }
    }
    cc_group_sum(part, red, pw, W + 1, 0, W + 1, row, c.D, d, d_valid, lid, gd, d_fastest);
  } else {
    if (d_valid) {
      cc_input_grad_generic<T>(c, dx, b, d, t0, t1);
    }
    cc_weight_grad_generic(c, part, red, b, d, d_valid, t0, t1, row, lid, gd, d_fastest);
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
// (the loader then finds them missing from the library and sends bfloat16 to
// the reference path). The test is the one PyTorch's own headers use.
#if defined(__METAL_VERSION__) && __METAL_VERSION__ >= 310
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
