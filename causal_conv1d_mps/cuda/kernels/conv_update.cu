// The decode step in its common case (docs/CUDA_KERNELS.md, "The decode step"): one token per row, the state
// shifted in place (no cache_seqlens), 16-bit x and state, each row's state in its own row or, with CC_SLOTS,
// in the slot conv_state_indices names. Launched by causal_conv1d_mps/cuda/launch_update.py; the Triton kernel
// serves every other case.
//
// Thread p of row b (grid x: blocks of threads over the channel pairs, grid y: rows) owns channels 2p and
// 2p + 1. Their 2 * CC_S state entries are consecutive in memory (the state's steps are contiguous and its
// channel stride is CC_S), so the thread reads them as CC_S 32-bit words, forms both outputs from registers,
// and writes the shifted words back: one pass, no barrier, no other thread touches them. Arithmetic in
// float32 in the Triton kernel's order (bias, then the taps oldest first), one rounding per output; the
// state moves bit for bit (NaN payloads included).
//
// Strides are in 32-bit words (x's and out's rows, the state's rows) and in elements (weight, bias).

// the 16 bits of entry e of the pair's 2 * CC_S entries (channel 2p's CC_S, then channel 2p + 1's)
__device__ __forceinline__ unsigned int cc_entry(const unsigned int (&s)[CC_S], int e) {
    return e & 1 ? s[e >> 1] >> 16 : s[e >> 1] & 0xFFFFu;
}

// entry e of the shifted state: its channel's next entry, or for the channel's last entry the new token
__device__ __forceinline__ unsigned int cc_shifted(const unsigned int (&s)[CC_S], unsigned int token, int e) {
    const int channel = e / CC_S;
    if (e % CC_S == CC_S - 1) return channel ? token >> 16 : token & 0xFFFFu;
    return cc_entry(s, e + 1);
}

// slots: int32 [B], each row's state slot (CC_SLOTS; a stand-in pointer otherwise). A negative slot is a
// padding row, and so is one past the state's `rows` (the api rejects those on CPU; a GPU cannot check them
// without a sync): its output is 0 and no state is touched, as in the Triton kernel. Two rows naming one slot
// race on it: the caller's error, as in every decode cache.
extern "C" __global__ void cc_conv_update(
        const unsigned int* __restrict__ x, unsigned int* __restrict__ state, const cc_wt* __restrict__ weight,
        const cc_wt* __restrict__ bias, const int* __restrict__ slots, unsigned int* __restrict__ out,
        int pairs, int x_row, int state_row, int out_row, int w_d, int w_k, int b_d, int rows) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x, b = blockIdx.y;
    if (p >= pairs) return;
#if CC_SLOTS
    const int n = slots[b];
    if (n < 0 || n >= rows) {
        out[(long long)b * out_row + p] = 0u;
        return;
    }
#else
    const int n = b;
#endif
    const unsigned int token = x[(long long)b * x_row + p];
    unsigned int* const sp = state + (long long)n * state_row + (long long)p * CC_S;
    unsigned int s[CC_S];
#pragma unroll
    for (int j = 0; j < CC_S; ++j) s[j] = sp[j];
    float y[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        const long long d = 2 * p + c;
        const float xc = CC_X_TO_FLOAT(c ? token >> 16 : token & 0xFFFFu);
        float acc = CC_HAS_BIAS ? cc_w_to_float(bias[d * b_d]) : 0.f;
#pragma unroll
        for (int k = 0; k < CC_W - 1; ++k)  // tap k reads entry S - (W - 1) + k of the channel's state
            acc = fmaf(cc_w_to_float(weight[d * w_d + k * w_k]),
                       CC_X_TO_FLOAT(cc_entry(s, c * CC_S + CC_S - (CC_W - 1) + k)), acc);
        acc = fmaf(cc_w_to_float(weight[d * w_d + (CC_W - 1) * w_k]), xc, acc);
        acc = cc_activation(acc);
        if (CC_RESIDUAL) acc += xc;
        y[c] = acc;
    }
    out[(long long)b * out_row + p] = cc_pack2(y[0], y[1]);
#pragma unroll
    for (int j = 0; j < CC_S; ++j) sp[j] = cc_shifted(s, token, 2 * j) | (cc_shifted(s, token, 2 * j + 1) << 16);
}
