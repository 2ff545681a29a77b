// Causal depthwise convolution over x (B, D, T) with T contiguous, 16-bit inputs: forward and backward.
// Compiled at first use by NVRTC (causal_conv1d_mps/cuda/_runtime.py), and in CI as C++ on the CPU
// (cuda_harness/). The loader prepends the generated contract (causal_conv1d_mps/cuda/_source.py):
//   CC_W               filter width, 1 <= CC_W <= 17 (the W-1 steps before a thread's 8 fit two vectors)
//   CC_X_BF16          1: x, out, dout and dx are bfloat16; 0: float16
//   CC_WT              0: weight and bias are bfloat16, 1: float16, 2: float32
//   CC_HAS_BIAS        0 or 1
//   CC_ACTIVATION      an activation code; CC_ACTIVATION_<NAME> the codes of the registry
//   CC_VPT, CC_FWD_THREADS   the forward's alone: 16-byte vectors per thread, threads per block; set, the file
//                      compiles the forward, unset, the backward and the reduction
//
// The backward: a thread owns 8 consecutive steps of one (b, d) row: one 16-byte load. The W-1 steps before
// and after them are the CC_HALO neighbouring lanes' vectors on each side, exchanged by warp shuffles; the
// lanes at the warp's edges load theirs. The forward keeps CC_VPT vectors per thread (see there). Windows are
// in registers: no shared memory, no scratch. Arithmetic in float32. Strides are in units of 8 elements (the
// launcher checks 16-byte alignment).

// The shared helpers (conversions, weight type, packing, activations) are common.cuh, placed before this
// file by the loader.

// ------------------------------------------------------------------ warp exchange of one 16-byte vector
// vectors of halo on each side of a thread's own: enough for the W-1 neighbouring steps
#define CC_HALO ((CC_W - 1 + 7) / 8)

__device__ __forceinline__ uint4 cc_from_lane_below(uint4 v, int delta) {
    return make_uint4(__shfl_up_sync(0xFFFFFFFFu, v.x, delta), __shfl_up_sync(0xFFFFFFFFu, v.y, delta),
                      __shfl_up_sync(0xFFFFFFFFu, v.z, delta), __shfl_up_sync(0xFFFFFFFFu, v.w, delta));
}

__device__ __forceinline__ uint4 cc_from_lane_above(uint4 v, int delta) {
    return make_uint4(__shfl_down_sync(0xFFFFFFFFu, v.x, delta), __shfl_down_sync(0xFFFFFFFFu, v.y, delta),
                      __shfl_down_sync(0xFFFFFFFFu, v.z, delta), __shfl_down_sync(0xFFFFFFFFu, v.w, delta));
}

// xs[0 .. 8*CC_HALO) = the CC_HALO vectors before vector v of row xr (zeros before the row), oldest first.
// Every lane of the warp must call it (shuffles); `cur` is the lane's own vector (zeros past the end).
__device__ __forceinline__ void cc_halo_before(const uint4* __restrict__ xr, uint4 cur, int v, int n8, int lane,
                                               float* xs) {
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int h = 1; h <= CC_HALO; ++h) {
        uint4 p = cc_from_lane_below(cur, h);
        if (lane < h) p = (v - h >= 0 && v - h < n8) ? xr[v - h] : zero;
        cc_unpack8(p, xs + 8 * (CC_HALO - h));
    }
}

// xs[0 .. 8*CC_HALO) = the CC_HALO vectors after vector v (zeros from `end` on), nearest first. `last_lane`:
// the highest lane whose vector is in this pass; lanes above it and the lanes that would read past it load.
__device__ __forceinline__ void cc_halo_after(const uint4* __restrict__ xr, uint4 cur, int v, int end, int lane,
                                              int last_lane, float* xs) {
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int h = 1; h <= CC_HALO; ++h) {
        uint4 p = cc_from_lane_above(cur, h);
        if (lane + h > last_lane) p = v + h < end ? xr[v + h] : zero;
        cc_unpack8(p, xs + 8 * (h - 1));
    }
}

__device__ __forceinline__ void cc_load_filter(const cc_wt* __restrict__ weight, const cc_wt* __restrict__ bias,
                                               int d, int w_stride_d, int w_stride_k, int bias_stride,
                                               float* wk, float* bs) {
#pragma unroll
    for (int k = 0; k < CC_W; ++k) wk[k] = cc_w_to_float(weight[(long long)d * w_stride_d + (long long)k * w_stride_k]);
#if CC_HAS_BIAS
    *bs = cc_w_to_float(bias[(long long)d * bias_stride]);
#else
    *bs = 0.f;
#endif
}

#define CC_THREADS 128

// ------------------------------------------------------------------ forward
#ifdef CC_VPT  // the forward: the variants with its own define (the backward and the reduction below otherwise)
// CC_VPT: 16-byte vectors per thread (1, 2 or 4), chosen by width by the launcher; CC_FWD_THREADS: threads per
// block (64 or 128), chosen so that a block spans no more of a row than it holds where that is possible.
// A thread owns CC_VPT vectors of one row, 32 vectors apart: vector j of a lane is its warp's base + 32 j +
// lane, so each load instruction of a warp reads 512 contiguous bytes, and all CC_VPT loads are in flight
// before any arithmetic. The halo of vector j (the CC_HALO vectors before it) comes from lane - h's vector j,
// or, for lanes < h, from lane 32 + lane - h's vector j - 1 (one rotation of each vector by shuffles); only
// vector 0 of the lowest lanes loads its halo. Measured on an H200 against one vector per thread
// (benchmarks/prototypes/cuda_bdt_fwd.py, docs/PERF_NOTES.md v9).
// out[b, d, t] = act(bias[d] + sum_k w[d, k] * x[b, d, t - (W-1) + k]), zeros before t = 0.
// grid (ceil(T/8 / (CC_FWD_THREADS * CC_VPT)), D, B), block CC_FWD_THREADS. n8 = T / 8; strides in units of 8
// elements.
__device__ __forceinline__ uint4 cc_from_lane(uint4 v, int src) {
    return make_uint4(__shfl_sync(0xFFFFFFFFu, v.x, src), __shfl_sync(0xFFFFFFFFu, v.y, src),
                      __shfl_sync(0xFFFFFFFFu, v.z, src), __shfl_sync(0xFFFFFFFFu, v.w, src));
}

extern "C" __global__ void __launch_bounds__(CC_FWD_THREADS) cc_conv_fwd_bdt(
        const uint4* __restrict__ x, const cc_wt* __restrict__ weight, const cc_wt* __restrict__ bias,
        uint4* __restrict__ out, int n8, int x_stride_b, int x_stride_d, int out_stride_b, int out_stride_d,
        int w_stride_d, int w_stride_k, int bias_stride) {
    const int d = blockIdx.y, b = blockIdx.z, lane = threadIdx.x & 31;
    const int v0 = blockIdx.x * (CC_FWD_THREADS * CC_VPT) + (threadIdx.x >> 5) * (32 * CC_VPT) + lane;
    const uint4* xr = x + (long long)b * x_stride_b + (long long)d * x_stride_d;
    uint4* orow = out + (long long)b * out_stride_b + (long long)d * out_stride_d;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    uint4 raw[CC_VPT];
#pragma unroll
    for (int j = 0; j < CC_VPT; ++j) {  // every load first
        const int v = v0 + 32 * j;
        raw[j] = v < n8 ? xr[v] : zero;
    }
    float wk[CC_W], bs;
    cc_load_filter(weight, bias, d, w_stride_d, w_stride_k, bias_stride, wk, &bs);
    // halo[h-1][j]: vector (v0 + 32 j) - h. Every lane shuffles (no lane has returned).
    uint4 halo[CC_HALO > 0 ? CC_HALO : 1][CC_VPT];
#pragma unroll
    for (int h = 1; h <= CC_HALO; ++h) {
        uint4 prev = zero;  // for lanes < h: lane 32 + lane - h's previous vector; before vector 0, loaded
        if (lane < h && v0 - h >= 0 && v0 - h < n8) prev = xr[v0 - h];
#pragma unroll
        for (int j = 0; j < CC_VPT; ++j) {
            const uint4 rotated = cc_from_lane(raw[j], (lane - h) & 31);
            halo[h - 1][j] = lane >= h ? rotated : prev;
            prev = rotated;
        }
    }
#pragma unroll
    for (int j = 0; j < CC_VPT; ++j) {
        float xs[8 * CC_HALO + 8];  // the halo (oldest first), then vector j's own 8 steps
#pragma unroll
        for (int h = 1; h <= CC_HALO; ++h) cc_unpack8(halo[h - 1][j], xs + 8 * (CC_HALO - h));
        cc_unpack8(raw[j], xs + 8 * CC_HALO);
        float o[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            float acc = bs;
#pragma unroll
            for (int k = 0; k < CC_W; ++k) acc = fmaf(wk[k], xs[8 * CC_HALO + i - (CC_W - 1) + k], acc);
            o[i] = cc_activation(acc);
        }
        const int v = v0 + 32 * j;
        if (v < n8) orow[v] = cc_pack8(o);
    }
}

#else  // CC_VPT: the backward and the reduction of the weight gradient

// ------------------------------------------------------------------ backward
// dpre[t] = dout[t] * act'(pre[t]) (pre recomputed from x);  dx[s] = sum_k w[k] * dpre[s + W-1-k];
// dweight[k] = sum_t dpre[t] * x[t - (W-1) + k] (the zeros before t = 0 included: 0 * NaN is NaN, as
// in the reference);  dbias = sum_t dpre[t].
// grid (D, B, chunks), block 128: block (d, b, c) walks steps [c * chunk8 * 8, ...) of row (b, d),
// 1024 steps per pass, and writes one float32 partial row dw_part[(c * B + b) * D + d][0..W] (W: bias),
// which the launcher sums in a fixed order. With one row per channel (B = 1, one chunk) that row is the
// gradient: the block writes dweight [D, W] (contiguous) and dbias [D] itself, in the weight's dtype, and
// the launcher skips the reduction (its sum of one row, 0 + s, is s: s is never -0, being 0 + ... too).
extern "C" __global__ void __launch_bounds__(CC_THREADS) cc_conv_bwd_bdt(
        const uint4* __restrict__ x, const cc_wt* __restrict__ weight, const cc_wt* __restrict__ bias,
        const uint4* __restrict__ dout, uint4* __restrict__ dx, float* __restrict__ dw_part,
        cc_wt* __restrict__ dweight, cc_wt* __restrict__ dbias, int n8, int chunk8, int B, int D,
        int x_stride_b, int x_stride_d, int dout_stride_b, int dout_stride_d, int dx_stride_b, int dx_stride_d,
        int w_stride_d, int w_stride_k, int bias_stride) {
    const int d = blockIdx.x, b = blockIdx.y, c = blockIdx.z, lane = threadIdx.x & 31;
    const uint4* xr = x + (long long)b * x_stride_b + (long long)d * x_stride_d;
    const uint4* gr = dout + (long long)b * dout_stride_b + (long long)d * dout_stride_d;
    uint4* dxr = dx + (long long)b * dx_stride_b + (long long)d * dx_stride_d;
    float wk[CC_W], bs;
    cc_load_filter(weight, bias, d, w_stride_d, w_stride_k, bias_stride, wk, &bs);
    float acc_dw[CC_W + 1];
#pragma unroll
    for (int k = 0; k <= CC_W; ++k) acc_dw[k] = 0.f;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    const int v_end = min(n8, (c + 1) * chunk8);
    // the trip count is the same for every thread of the block: the shuffles see the whole warp
    for (int v0 = c * chunk8; v0 < v_end; v0 += CC_THREADS) {
        const int v = v0 + threadIdx.x;
        const bool ok = v < v_end;
        const uint4 xc = ok ? xr[v] : zero, gc = ok ? gr[v] : zero;
        // the last lane with a vector of this pass and chunk; the halo after it comes from memory
        const int last_lane = min(31, v_end - 1 - (v - lane));
        float xs[16 * CC_HALO + 8], gs[8 * CC_HALO + 8];  // x: halo, own, halo; dout: own, halo
        cc_halo_before(xr, xc, v, n8, lane, xs);
        cc_unpack8(xc, xs + 8 * CC_HALO);
        cc_halo_after(xr, xc, v, n8, lane, last_lane, xs + 8 * CC_HALO + 8);
        cc_unpack8(gc, gs);
        cc_halo_after(gr, gc, v, n8, lane, last_lane, gs + 8);
        // dpre of the 8 own rows and the W-1 after them; rows past T are no outputs (selected to 0)
        float dp[8 + CC_W - 1];
#pragma unroll
        for (int i = 0; i < 8 + CC_W - 1; ++i) {
            float pre = bs;
#pragma unroll
            for (int k = 0; k < CC_W; ++k) pre = fmaf(wk[k], xs[8 * CC_HALO + i - (CC_W - 1) + k], pre);
            dp[i] = 8 * v + i < 8 * n8 ? cc_activation_grad(pre, gs[i]) : 0.f;
        }
        if (ok) {
            float o[8];
#pragma unroll
            for (int s = 0; s < 8; ++s) {
                float acc = 0.f;
#pragma unroll
                for (int k = 0; k < CC_W; ++k) acc = fmaf(wk[k], dp[s + CC_W - 1 - k], acc);
                o[s] = acc;
            }
            dxr[v] = cc_pack8(o);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
#pragma unroll
                for (int k = 0; k < CC_W; ++k)
                    acc_dw[k] = fmaf(dp[i], xs[8 * CC_HALO + i - (CC_W - 1) + k], acc_dw[k]);
                acc_dw[CC_W] += dp[i];
            }
        }
    }
    __shared__ float partial[CC_THREADS / 32][CC_W + 1];
#pragma unroll
    for (int k = 0; k <= CC_W; ++k) {
        float s = acc_dw[k];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, off);
        if (lane == 0) partial[threadIdx.x >> 5][k] = s;
    }
    __syncthreads();
    if (threadIdx.x <= CC_W) {
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < CC_THREADS / 32; ++i) s += partial[i][threadIdx.x];
        if (gridDim.z * B != 1) {
            dw_part[((long long)c * B + b) * D * (CC_W + 1) + (long long)d * (CC_W + 1) + threadIdx.x] = s;
        } else if (threadIdx.x < CC_W) {
            dweight[d * CC_W + threadIdx.x] = cc_float_to_w(s);
        } else {
#if CC_HAS_BIAS
            dbias[d] = cc_float_to_w(s);
#endif
        }
    }
}

// ------------------------------------------------------------------ weight and bias gradients
// Column sums of the partial rows dw_part [P, D * (W+1)] in a fixed order (bitwise deterministic), cast once
// to the weight's dtype: dweight [D, W] contiguous, dbias [D]. grid (ceil(D * (W+1) / 256)), block 256.
extern "C" __global__ void __launch_bounds__(256) cc_reduce_partials(
        const float* __restrict__ dw_part, cc_wt* __restrict__ dweight, cc_wt* __restrict__ dbias, int P, int D) {
    const int col = blockIdx.x * 256 + threadIdx.x, n_cols = D * (CC_W + 1);
    if (col >= n_cols) return;
    float s = 0.f;
    for (int p = 0; p < P; ++p) s += dw_part[(long long)p * n_cols + col];
    const int d = col / (CC_W + 1), k = col - d * (CC_W + 1);
    if (k < CC_W) dweight[d * CC_W + k] = cc_float_to_w(s);
#if CC_HAS_BIAS
    else dbias[d] = cc_float_to_w(s);
#endif
}

#endif  // CC_VPT
