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
//   CC_HAS_MASK        1: a float32 mask [B, T] contiguous multiplies the conv input (by selection: where it is
//                      0 the input counts as 0, NaN included); 0: none
//   CC_RESIDUAL        1: out adds the unmasked x
//
// A thread owns CC_VEC channels (one 8-byte vector per step) and CC_RUN consecutive steps. It issues every
// load first (its CC_RUN + W-1 rows and their mask values: predicated loads, no branch between them, so all
// are in flight together), converts each row once, then forms the W taps from registers. The W-1 rows
// before a run are loaded again by the thread of the run before (L1/L2 hits). Arithmetic in float32.
// Measured on an H200 against the shipped Triton kernels: docs/PERF_NOTES.md, v8.

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

// out[b, t, c] = (x[b, t, c] if residual) + act(bias[c] + sum_k w[c, k] * xm[b, t - (W-1) + k, c]), where
// xm = x (times the mask where it is non-zero, 0 where it is 0), zeros before t = 0.
// grid (ceil(T / CC_RUN), ceil(D4 / CC_BTD_THREADS), B), block CC_BTD_THREADS. D4 = D / 4; x and out strides
// over B and T in units of 4 elements; weight [D, W] contiguous; mask [B, T] contiguous (a stand-in pointer
// when CC_HAS_MASK is 0).
extern "C" __global__ void __launch_bounds__(CC_BTD_THREADS) cc_conv_fwd_btd(
        const uint2* __restrict__ x, const cc_wt* __restrict__ weight, const cc_wt* __restrict__ bias,
        const float* __restrict__ mask, uint2* __restrict__ out, int T, int D4, int x_stride_b, int x_stride_t,
        int out_stride_b, int out_stride_t) {
    constexpr int H = CC_W - 1, N = CC_RUN + H;
    const int c = blockIdx.y * CC_BTD_THREADS + threadIdx.x, b = blockIdx.z, t0 = blockIdx.x * CC_RUN;
    if (c >= D4) return;
    const uint2* xb = x + (long long)b * x_stride_b + c;
    uint2 raw[N];
    float m[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int t = t0 - H + i;
        const bool inside = t >= 0 && t < T;
        raw[i] = inside ? xb[(long long)t * x_stride_t] : make_uint2(0u, 0u);
#if CC_HAS_MASK
        m[i] = inside ? mask[(long long)b * T + t] : 0.f;
#else
        m[i] = 1.f;
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
    float xf[N][CC_VEC];
#pragma unroll
    for (int i = 0; i < N; ++i) {
        float f[CC_VEC];
        cc_unpack4(raw[i], f);
#pragma unroll
        for (int j = 0; j < CC_VEC; ++j) xf[i][j] = CC_HAS_MASK ? (m[i] != 0.f ? f[j] * m[i] : 0.f) : f[j];
    }
    uint2* ob = out + (long long)b * out_stride_b + c;
#pragma unroll
    for (int r = 0; r < CC_RUN; ++r) {
        float o[CC_VEC];
#pragma unroll
        for (int j = 0; j < CC_VEC; ++j) {
            float acc = bs[j];
#pragma unroll
            for (int k = 0; k < CC_W; ++k) acc = fmaf(wk[k][j], xf[r + k][j], acc);
            o[j] = cc_activation(acc);
        }
#if CC_RESIDUAL
        float res[CC_VEC];
        cc_unpack4(raw[r + H], res);
#pragma unroll
        for (int j = 0; j < CC_VEC; ++j) o[j] += res[j];
#endif
        if (t0 + r < T) ob[(long long)(t0 + r) * out_stride_t] = cc_pack4(o);
    }
}
