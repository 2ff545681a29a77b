// Causal depthwise convolution over x [B, T, D] with D contiguous (channel-last), 16-bit inputs: the forward of
// `causal_conv1d` on a channel-last x and of `short_conv_fused` (mask, bias, activation, residual).
// Compiled at first use by NVRTC (causal_conv1d_mps/cuda/_runtime.py), and in CI as C++ on the CPU
// (cuda_harness/). The loader places the generated contract (causal_conv1d_mps/cuda/_source.py) and common.cuh
// before this file:
//   CC_W               filter width, 1 <= CC_W <= 16
//   CC_X_BF16          1: x and out are bfloat16; 0: float16
//   CC_WT              0: weight and bias are bfloat16, 1: float16, 2: float32
//   CC_HAS_BIAS        0 or 1
//   CC_ACTIVATION      an activation code; CC_ACTIVATION_<NAME> the codes of the registry
//   CC_HAS_MASK        1: a mask [B, T] contiguous multiplies the conv input (by selection: where it is 0 the
//                      input counts as 0, NaN included); 0: none
//   CC_MASK_T          the mask's element type, one of the generated codes CC_MASK_<TYPE> (float32, int64,
//                      int32, bool): an HF attention mask is read as it comes, with no conversion kernel
//   CC_RESIDUAL        1: out adds the unmasked x
//   CC_BWD_VEC, CC_BWD_RUN   the backward's alone (see there); set, the file compiles the backward, unset,
//                      the forward
//
// A thread owns CC_VEC channels (one 8-byte vector per step) and CC_RUN consecutive steps. It issues every
// load first (its CC_RUN + W-1 rows and their mask values: predicated loads, no branch between them, so all
// are in flight together), then converts each row once as the window reaches it and forms the W taps from
// registers; where every mask value of the run is 1 (most runs of a padded batch) it skips the mask's select
// and multiply. The W-1 rows before a run are loaded again by the thread of the run before (L1/L2 hits).
// Arithmetic in float32. Measured on an H200 against the shipped Triton kernels: docs/PERF_NOTES.md, v8, v9.

#define CC_VEC 4       // channels per thread: 8 bytes of 16-bit values
#define CC_RUN 8       // steps per thread
#define CC_BTD_THREADS 64

__device__ __forceinline__ void cc_unpack4(uint2 v, float* f) {
    f[0] = CC_X_TO_FLOAT(v.x & 0xFFFFu);
    f[1] = CC_X_TO_FLOAT(v.x >> 16);
    f[2] = CC_X_TO_FLOAT(v.y & 0xFFFFu);
    f[3] = CC_X_TO_FLOAT(v.y >> 16);
}

__device__ __forceinline__ uint2 cc_pack4(const float* f) {
    return make_uint2(cc_pack2(f[0], f[1]), cc_pack2(f[2], f[3]));
}

// CC_VEC consecutive weight-typed values starting at `p` (aligned to their vector: the launcher checks)
__device__ __forceinline__ void cc_load_w4(const cc_wt* __restrict__ p, float* f) {
#if CC_WT == 2
    const float4 v = *reinterpret_cast<const float4*>(p);
    f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w;
#else
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    f[0] = cc_w_to_float((cc_u16)(v.x & 0xFFFFu));
    f[1] = cc_w_to_float((cc_u16)(v.x >> 16));
    f[2] = cc_w_to_float((cc_u16)(v.y & 0xFFFFu));
    f[3] = cc_w_to_float((cc_u16)(v.y >> 16));
#endif
}

#if CC_MASK_T == CC_MASK_FLOAT32
typedef float cc_mask_t;
#elif CC_MASK_T == CC_MASK_INT64
typedef long long cc_mask_t;
#elif CC_MASK_T == CC_MASK_INT32
typedef int cc_mask_t;
#elif CC_MASK_T == CC_MASK_BOOL
typedef unsigned char cc_mask_t;  // torch.bool: one byte holding 0 or 1
#else
#error "CC_MASK_T: one of the CC_MASK_<TYPE> codes"
#endif

// a mask value as float32 (as `mask.to(torch.float32)` gives it). Converting a 64-bit integer is a slow
// instruction (H200: the forward lost 4-5 points of copy converting every int64 value), so an integer 0 or 1,
// all an HF mask holds, is selected instead, and the forward converts only off its all-ones path.
__device__ __forceinline__ float cc_mask_float(cc_mask_t v) {
#if CC_MASK_T == CC_MASK_FLOAT32
    return v;
#else
    return v == (cc_mask_t)1 ? 1.f : (v == (cc_mask_t)0 ? 0.f : (float)v);
#endif
}

__device__ __forceinline__ float cc_mask_at(const cc_mask_t* __restrict__ mask, long long i) {
    return cc_mask_float(mask[i]);
}

#ifndef CC_BWD_VEC  // the forward: every variant without the backward's own defines

// The run's outputs from its loaded rows: row i converted when the window reaches it, output i - (W-1)
// formed at once (converting every row first kept them all live; H200, docs/PERF_NOTES.md v9). ONES: every
// mask value of the run is 1 (or there is no mask): no select, no multiply, no conversion of the mask values
// (`m` holds them as loaded).
template <bool ONES>
__device__ __forceinline__ void cc_btd_outputs(const uint2 (&raw)[CC_RUN + CC_W - 1],
                                               const cc_mask_t (&m)[CC_RUN + CC_W - 1],
                                               const float (&wk)[CC_W][CC_VEC],
                                               const float (&bs)[CC_VEC], uint2* __restrict__ ob, int t0, int T,
                                               int out_stride_t) {
    constexpr int H = CC_W - 1, N = CC_RUN + H;
    float xf[N][CC_VEC];
#pragma unroll
    for (int i = 0; i < N; ++i) {
        float f[CC_VEC];
        cc_unpack4(raw[i], f);
        if (CC_HAS_MASK && !ONES) {
            const float mi = cc_mask_float(m[i]);
#pragma unroll
            for (int j = 0; j < CC_VEC; ++j) xf[i][j] = mi != 0.f ? f[j] * mi : 0.f;
        } else {
#pragma unroll
            for (int j = 0; j < CC_VEC; ++j) xf[i][j] = f[j];
        }
        if (i < H) continue;
        const int r = i - H;
        float o[CC_VEC];
#pragma unroll
        for (int j = 0; j < CC_VEC; ++j) {
            float acc = bs[j];
#pragma unroll
            for (int k = 0; k < CC_W; ++k) acc = fmaf(wk[k][j], xf[r + k][j], acc);
            o[j] = cc_activation(acc);
        }
#if CC_RESIDUAL
#pragma unroll
        for (int j = 0; j < CC_VEC; ++j) o[j] += f[j];  // row i is step t0 + r: the unmasked x
#endif
        if (t0 + r < T) ob[(long long)(t0 + r) * out_stride_t] = cc_pack4(o);
    }
}

// out[b, t, c] = (x[b, t, c] if residual) + act(bias[c] + sum_k w[c, k] * xm[b, t - (W-1) + k, c]), where
// xm = x (times the mask where it is non-zero, 0 where it is 0), zeros before t = 0.
// grid (ceil(T / CC_RUN), ceil(D4 / CC_BTD_THREADS), B), block CC_BTD_THREADS. D4 = D / 4; x and out strides
// over B and T in units of 4 elements; weight [D, W] contiguous; mask [B, T] contiguous (a stand-in pointer
// when CC_HAS_MASK is 0), of CC_MASK_T's type.
extern "C" __global__ void __launch_bounds__(CC_BTD_THREADS) cc_conv_fwd_btd(
        const uint2* __restrict__ x, const cc_wt* __restrict__ weight, const cc_wt* __restrict__ bias,
        const cc_mask_t* __restrict__ mask, uint2* __restrict__ out, int T, int D4, int x_stride_b, int x_stride_t,
        int out_stride_b, int out_stride_t) {
    constexpr int H = CC_W - 1, N = CC_RUN + H;
    const int c = blockIdx.y * CC_BTD_THREADS + threadIdx.x, b = blockIdx.z, t0 = blockIdx.x * CC_RUN;
    if (c >= D4) return;
    const uint2* xb = x + (long long)b * x_stride_b + c;
    uint2 raw[N];
    cc_mask_t m[N];
    bool ones = true;  // every mask value of the run's rows is 1 (the same for every thread of the block)
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int t = t0 - H + i;
        const bool inside = t >= 0 && t < T;
        raw[i] = inside ? xb[(long long)t * x_stride_t] : make_uint2(0u, 0u);
#if CC_HAS_MASK
        m[i] = inside ? mask[(long long)b * T + t] : (cc_mask_t)1;  // outside, x reads as 0 whatever the mask
        ones = ones && m[i] == (cc_mask_t)1;
#else
        m[i] = (cc_mask_t)1;
#endif
    }
    float wk[CC_W][CC_VEC], bs[CC_VEC];
    {
        float flat[CC_VEC * CC_W];  // the thread's CC_VEC channels' weights are CC_VEC * W contiguous values
#pragma unroll
        for (int i = 0; i < CC_W; ++i) cc_load_w4(weight + ((long long)c * CC_W + i) * CC_VEC, flat + CC_VEC * i);
#pragma unroll
        for (int j = 0; j < CC_VEC; ++j)
#pragma unroll
            for (int k = 0; k < CC_W; ++k) wk[k][j] = flat[j * CC_W + k];
#if CC_HAS_BIAS
        cc_load_w4(bias + (long long)c * CC_VEC, bs);
#else
#pragma unroll
        for (int j = 0; j < CC_VEC; ++j) bs[j] = 0.f;
#endif
    }
    uint2* ob = out + (long long)b * out_stride_b + c;
    if (ones)  // block-uniform: no divergence
        cc_btd_outputs<true>(raw, m, wk, bs, ob, t0, T, out_stride_t);
    else
        cc_btd_outputs<false>(raw, m, wk, bs, ob, t0, T, out_stride_t);
}

#else  // CC_BWD_VEC: the backward

// ------------------------------------------------------------------ backward
// The gradients of the forward above, recomputing pre from x (nothing saved by the forward):
//   g[t]   = act'(pre[t]) * dout[t] for t < T, 0 from T on;
//   dx[s]  = (mask[s] != 0 ? mask[s] * sum_k w[k] * g[s + W-1-k] : 0) + (dout[s] if residual);
//   dweight[k] = sum_t g[t] * xm[t - (W-1) + k] (the zeros before t = 0 included: 0 * NaN is NaN, as in
//   the reference);  dbias = sum_t g[t].
// A thread owns CC_BWD_VEC channels of one chunk of `chunk` steps [t0, t1) and streams rows t0 .. t1 + W-2
// (the W-1 after the chunk give the g that dx of its last rows reads) in batches of CC_BWD_RUN rows: each
// batch issues its row loads first (x, dout, mask: predicated, no branch), then forms g of its rows, the
// dweight terms of those inside the chunk, and dx of the rows W-1 behind. Windows of W-1 rows (masked x,
// g, raw dout for the residual, mask) carry over from batch to batch in registers; only the W-1 rows before
// and after a chunk are read twice. The backward holds three windows, so the launcher picks channels per
// thread and rows per batch by width and mask as measured (H200, docs/PERF_NOTES.md v9). Each thread writes
// its own
// float32 partial rows, dw_part[(chunk index * B + b) * D + d][0..W] (W: bias), which cc_reduce_partials
// (conv_bdt.cu) sums in a fixed order.
// grid (chunks, ceil(Dv / CC_BTD_THREADS), B), block CC_BTD_THREADS; Dv = D / CC_BWD_VEC; strides in units
// of CC_BWD_VEC elements.
// The launcher's defines of this kernel alone (causal_conv1d_mps/cuda/_source.py, KERNEL_DEFINES):
//   CC_BWD_VEC    channels per thread: 2 (one 4-byte word per row) or 4 (8 bytes)
//   CC_BWD_RUN    rows per batch

#if CC_BWD_VEC == 4
typedef uint2 cc_bvec;
__device__ __forceinline__ cc_bvec cc_bzero() { return make_uint2(0u, 0u); }
__device__ __forceinline__ void cc_bunpack(cc_bvec v, float* f) { cc_unpack4(v, f); }
__device__ __forceinline__ cc_bvec cc_bpack(const float* f) { return cc_pack4(f); }
#elif CC_BWD_VEC == 2
typedef unsigned int cc_bvec;
__device__ __forceinline__ cc_bvec cc_bzero() { return 0u; }
__device__ __forceinline__ void cc_bunpack(cc_bvec v, float* f) {
    f[0] = CC_X_TO_FLOAT(v & 0xFFFFu);
    f[1] = CC_X_TO_FLOAT(v >> 16);
}
__device__ __forceinline__ cc_bvec cc_bpack(const float* f) { return cc_pack2(f[0], f[1]); }
#else
#error "CC_BWD_VEC: 2 or 4"
#endif

extern "C" __global__ void __launch_bounds__(CC_BTD_THREADS) cc_conv_bwd_btd(
        const cc_bvec* __restrict__ x, const cc_wt* __restrict__ weight, const cc_wt* __restrict__ bias,
        const cc_mask_t* __restrict__ mask, const cc_bvec* __restrict__ dout, cc_bvec* __restrict__ dx,
        float* __restrict__ dw_part, int T, int Dv, int chunk, int B, int x_stride_b, int x_stride_t,
        int dout_stride_b, int dout_stride_t, int dx_stride_b, int dx_stride_t) {
    constexpr int H = CC_W - 1, R = CC_BWD_RUN, N = H + R, V = CC_BWD_VEC;
    const int c = blockIdx.y * CC_BTD_THREADS + threadIdx.x, b = blockIdx.z;
    if (c >= Dv) return;
    const int t0 = blockIdx.x * chunk, t1 = min(t0 + chunk, T);
    const cc_bvec* xb = x + (long long)b * x_stride_b + c;
    const cc_bvec* gb = dout + (long long)b * dout_stride_b + c;
    cc_bvec* dxb = dx + (long long)b * dx_stride_b + c;
    const cc_mask_t* mb = mask + (long long)b * T;
    float wk[CC_W][V], bs[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {  // once per chunk: scalar loads (2W values need not be vector-aligned)
#pragma unroll
        for (int k = 0; k < CC_W; ++k) wk[k][j] = cc_w_to_float(weight[((long long)c * V + j) * CC_W + k]);
        bs[j] = CC_HAS_BIAS ? cc_w_to_float(bias[(long long)c * V + j]) : 0.f;
    }
    // windows over rows [u - H, u + R) of the batch starting at row u: the first H carry over
    float xm[N][V], gw[N][V], mw[N];  // masked x, g, mask
    cc_bvec go[N];                     // raw dout, for the residual
    float adw[CC_W + 1][V];
#pragma unroll
    for (int k = 0; k <= CC_W; ++k)
#pragma unroll
        for (int j = 0; j < V; ++j) adw[k][j] = 0.f;
#pragma unroll
    for (int i = 0; i < H; ++i) {  // the H rows before the chunk: masked x only (their g is never read)
        const int t = t0 - H + i;
        const bool inside = t >= 0;
        const cc_bvec raw = inside ? xb[(long long)t * x_stride_t] : cc_bzero();
#if CC_HAS_MASK
        const float m = inside ? cc_mask_at(mb, t) : 0.f;
#else
        const float m = 1.f;
#endif
        float f[V];
        cc_bunpack(raw, f);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            xm[i][j] = CC_HAS_MASK ? (m != 0.f ? f[j] * m : 0.f) : f[j];
            gw[i][j] = 0.f;
        }
        go[i] = cc_bzero();
        mw[i] = 0.f;
    }
    const int end = min(t1 + H, T);  // rows past T have g = 0 and no dx: not streamed
    for (int u = t0; u < t1 + H; u += R) {
        cc_bvec rx[R];
        float rm[R];
#pragma unroll
        for (int i = 0; i < R; ++i) {  // every load of the batch first
            const int t = u + i;
            const bool inside = t < end;
            rx[i] = inside ? xb[(long long)t * x_stride_t] : cc_bzero();
            go[H + i] = inside ? gb[(long long)t * dout_stride_t] : cc_bzero();
#if CC_HAS_MASK
            rm[i] = inside ? cc_mask_at(mb, t) : 0.f;
#else
            rm[i] = 1.f;
#endif
        }
#pragma unroll
        for (int i = 0; i < R; ++i) {
            const int t = u + i;
            float f[V], gf[V];
            cc_bunpack(rx[i], f);
            cc_bunpack(go[H + i], gf);
            mw[H + i] = rm[i];
#pragma unroll
            for (int j = 0; j < V; ++j) xm[H + i][j] = CC_HAS_MASK ? (rm[i] != 0.f ? f[j] * rm[i] : 0.f) : f[j];
#pragma unroll
            for (int j = 0; j < V; ++j) {
                float pre = bs[j];
#pragma unroll
                for (int k = 0; k < CC_W; ++k) pre = fmaf(wk[k][j], xm[i + k][j], pre);
                gw[H + i][j] = t < T ? cc_activation_grad(pre, gf[j]) : 0.f;
            }
            if (t < t1) {  // an output row of this chunk: its share of dweight and dbias
#pragma unroll
                for (int j = 0; j < V; ++j) {
#pragma unroll
                    for (int k = 0; k < CC_W; ++k) adw[k][j] = fmaf(gw[H + i][j], xm[i + k][j], adw[k][j]);
                    adw[CC_W][j] += gw[H + i][j];
                }
            }
            const int s = t - H;  // every g that reads x[s] is known now
            if (s >= t0 && s < t1) {
                float o[V];
#if CC_RESIDUAL
                float res[V];
                cc_bunpack(go[i], res);
#endif
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    float acc = 0.f;
#pragma unroll
                    for (int k = 0; k < CC_W; ++k) acc = fmaf(wk[k][j], gw[i + H - k][j], acc);
#if CC_HAS_MASK
                    acc = mw[i] != 0.f ? acc * mw[i] : 0.f;
#endif
#if CC_RESIDUAL
                    acc += res[j];
#endif
                    o[j] = acc;
                }
                dxb[(long long)s * dx_stride_t] = cc_bpack(o);
            }
        }
#pragma unroll
        for (int i = 0; i < H; ++i) {  // the last H rows become the next batch's first
            mw[i] = mw[R + i];
            go[i] = go[R + i];
#pragma unroll
            for (int j = 0; j < V; ++j) {
                xm[i][j] = xm[R + i][j];
                gw[i][j] = gw[R + i][j];
            }
        }
    }
    float* p = dw_part + (((long long)blockIdx.x * B + b) * Dv + c) * V * (CC_W + 1);
#pragma unroll
    for (int j = 0; j < V; ++j)
#pragma unroll
        for (int k = 0; k <= CC_W; ++k) p[j * (CC_W + 1) + k] = adw[k][j];
}

#endif  // CC_BWD_VEC
