// Device helpers shared by the CUDA C++ kernel files (conv_bdt.cu, conv_btd.cu, conv_update.cu): 16-bit <->
// float32 conversions, the weight type, packing, the activations. The loader (causal_conv1d_mps/cuda/_source.py)
// places this text after the generated contract (CC_X_BF16, CC_WT, CC_ACTIVATION, ...) and before the
// kernel file; NVRTC and cuda_harness compile the three as one source.

typedef unsigned short cc_u16;

// Inline PTX only where a GPU compiler reads the source: cuda_harness (CI) compiles it as C++ for the CPU
// and takes the portable branches, which give the same bits.
#if defined(__CUDA_ARCH__) && !defined(CUDA_HARNESS)
#define CC_PTX 1
#else
#define CC_PTX 0
#endif

// ------------------------------------------------------------------ 16-bit <-> float32
__device__ __forceinline__ float cc_bf16_to_float(unsigned int bits) { return __uint_as_float(bits << 16); }

__device__ __forceinline__ unsigned int cc_float_to_bf16(float f) {
    const unsigned int u = __float_as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;     // NaN stays NaN
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;              // round to nearest even
}

__device__ __forceinline__ float cc_half_to_float(unsigned int bits) {
#if CC_PTX
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((cc_u16)bits));
    return f;
#else
    const unsigned int sign = (bits & 0x8000u) << 16, exp = (bits >> 10) & 0x1Fu, man = bits & 0x3FFu;
    if (exp == 0x1Fu) return __uint_as_float(sign | 0x7F800000u | (man << 13));   // Inf, NaN
    if (exp != 0) return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
    return __uint_as_float(sign) + (float)man * 5.9604644775390625e-08f;          // subnormal: man * 2^-24
#endif
}

__device__ __forceinline__ unsigned int cc_float_to_half(float f) {
#if CC_PTX
    cc_u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    const unsigned int u = __float_as_uint(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return sign | 0x7E00u;                  // NaN
    if (a >= 0x477FF000u) return sign | 0x7C00u;                 // rounds to >= 65520: Inf
    if (a < 0x38800000u) {                                       // below 2^-14: a subnormal half (or 0)
        const float scaled = __uint_as_float(a) * 16777216.f;    // in units of 2^-24, exact
        unsigned int q = (unsigned int)scaled;
        const float rest = scaled - (float)q;
        if (rest > 0.5f || (rest == 0.5f && (q & 1u))) ++q;      // round to nearest even
        return sign | q;
    }
    const unsigned int e = (a >> 23) - 112u, m = a & 0x7FFFFFu;
    unsigned int h = (e << 10) | (m >> 13);
    const unsigned int rest = m & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;     // may carry into the exponent: correct
    return sign | h;
#endif
}

#if CC_X_BF16
#define CC_X_TO_FLOAT cc_bf16_to_float
#define CC_FLOAT_TO_X cc_float_to_bf16
#else
#define CC_X_TO_FLOAT cc_half_to_float
#define CC_FLOAT_TO_X cc_float_to_half
#endif

#if CC_WT == 2
typedef float cc_wt;
__device__ __forceinline__ float cc_w_to_float(float v) { return v; }
__device__ __forceinline__ float cc_float_to_w(float v) { return v; }
#else
typedef cc_u16 cc_wt;
#if CC_WT == 0
__device__ __forceinline__ float cc_w_to_float(cc_u16 v) { return cc_bf16_to_float(v); }
__device__ __forceinline__ cc_u16 cc_float_to_w(float v) { return (cc_u16)cc_float_to_bf16(v); }
#else
__device__ __forceinline__ float cc_w_to_float(cc_u16 v) { return cc_half_to_float(v); }
__device__ __forceinline__ cc_u16 cc_float_to_w(float v) { return (cc_u16)cc_float_to_half(v); }
#endif
#endif

__device__ __forceinline__ void cc_unpack8(uint4 v, float* f) {
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = CC_X_TO_FLOAT(w[i] & 0xFFFFu);
        f[2 * i + 1] = CC_X_TO_FLOAT(w[i] >> 16);
    }
}

// two values rounded to nearest even into one 32-bit word, `lo` in the low half
__device__ __forceinline__ unsigned int cc_pack2(float lo, float hi) {
#if CC_PTX && __CUDA_ARCH__ >= 800
    unsigned int r;  // one instruction for both (sm_80+), NaN kept
#if CC_X_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
#else
    return CC_FLOAT_TO_X(lo) | (CC_FLOAT_TO_X(hi) << 16);
#endif
}

__device__ __forceinline__ uint4 cc_pack8(const float* f) {
    return make_uint4(cc_pack2(f[0], f[1]), cc_pack2(f[2], f[3]), cc_pack2(f[4], f[5]), cc_pack2(f[6], f[7]));
}

// ------------------------------------------------------------------ activations (codes: the registry's)
__device__ __forceinline__ float cc_activation(float pre) {
#if CC_ACTIVATION == CC_ACTIVATION_SILU
    return pre / (1.f + __expf(-pre));
#else
    return pre;
#endif
}

// d activation / d pre at `pre`, times the incoming gradient `g`
__device__ __forceinline__ float cc_activation_grad(float pre, float g) {
#if CC_ACTIVATION == CC_ACTIVATION_SILU
    const float s = 1.f / (1.f + __expf(-pre));
    return g * (s * (1.f + pre * (1.f - s)));
#else
    return g;
#endif
}

