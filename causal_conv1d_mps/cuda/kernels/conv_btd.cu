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
//   CC_FWD_VEC, CC_FWD_RUN, CC_FWD_INSIDE, CC_D   the forward's alone (see there)
//   CC_BWD_VEC, CC_BWD_RUN, CC_BWD_INSIDE, CC_BWD_D   the backward's alone (see there); CC_BWD_VEC set, the
//                      file compiles the backward, unset, the forward

#define CC_BTD_THREADS 64  // the backward's threads per block

__device__ __forceinline__ uint2 cc_pack4(const float* f) {
    return make_uint2(cc_pack2(f[0], f[1]), cc_pack2(f[2], f[3]));
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
// all an HF mask holds, is selected instead (the forward converts one value per lane and run, the backward
// one per row).
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

// The bfloat16 in half `h` (0: the low 16 bits) of `word`, as float32; the forward's and the backward's
// conversion. On the GPU the shift or mask is an asm statement: NVVM otherwise keeps weights and rows packed and
// converts them again at each use (sm_90 SASS of the forward at W = 16: 63 instructions per element, 31 with
// this and CC_D; benchmarks/prototypes/cuda_btd_wide.py), so each value is converted once.
__device__ __forceinline__ float cc_bf16_half(unsigned int word, int h) {
#if CC_PTX
    float f;
    if (h)
        asm("and.b32 %0, %1, 0xFFFF0000;" : "=f"(f) : "r"(word));
    else
        asm("shl.b32 %0, %1, 16;" : "=f"(f) : "r"(word));
    return f;
#else
    return cc_bf16_to_float(h ? word >> 16 : word & 0xFFFFu);
#endif
}

// the x-typed value in half `h` of `word` (x, dout and out share x's type), as float32
__device__ __forceinline__ float cc_x_half(unsigned int word, int h) {
#if CC_X_BF16
    return cc_bf16_half(word, h);
#else
    return cc_half_to_float(h ? word >> 16 : word & 0xFFFFu);
#endif
}

#ifndef CC_BWD_VEC  // the forward: every variant without the backward's own defines

// ------------------------------------------------------------------ forward
// A thread owns CC_FWD_VEC channels (one 8- or 4-byte vector per step) and CC_FWD_RUN consecutive steps. It
// issues every load of its run first (its CC_FWD_RUN + W-1 rows: predicated, no branch between them, so all
// are in flight together), then converts each row once as the window reaches it and forms the W taps from
// registers. The W-1 rows before a run are loaded again by the thread of the run before (L1/L2 hits).
// The mask: each lane of a warp loads one mask value of the run's rows (every thread of a block reads the
// same ones) and the rows take theirs by shuffle; one warp vote sends runs whose mask values are all 1 (all
// but the padded runs of an HF mask) down a path without the mask's select and multiply. Arithmetic in
// float32. The launcher picks the scheme per width and mask as measured on an H200
// (launch_btd.forward_variant; docs/PERF_NOTES.md v9). Its defines of this kernel alone
// (causal_conv1d_mps/cuda/_source.py, KERNEL_DEFINES):
//   CC_FWD_VEC     channels per thread: 4 or 2
//   CC_FWD_RUN     steps per thread: 8, 16 or 32
//   CC_FWD_INSIDE  1: a run whose steps and halo all lie in [0, T) (all but the first and last runs of a row;
//                  block-uniform) takes a copy of the code without bounds checks
//   CC_D           D itself where x and out are contiguous [B, T, D]: a run's rows are then one base address
//                  plus constant offsets (no address arithmetic per row); 0: the strides are arguments

#define CC_BTD_FWD_THREADS (256 / CC_FWD_VEC)  // threads per block: 256 channels per block in every scheme
#define CC_FWD_ROWS (CC_FWD_RUN + CC_W - 1)      // rows a run reads: the W-1 halo rows, then its steps
#define CC_FWD_SLOTS ((CC_FWD_ROWS + 31) / 32)   // mask values per lane
#define CC_FWD_WARP 0xFFFFFFFFu

#if CC_FWD_VEC == 4
typedef uint2 cc_frow;  // one step of the thread's channels
__device__ __forceinline__ cc_frow cc_frow_zero() { return make_uint2(0u, 0u); }
__device__ __forceinline__ unsigned int cc_frow_word(cc_frow v, int q) { return q == 0 ? v.x : v.y; }
__device__ __forceinline__ cc_frow cc_frow_pack(const float* f) { return cc_pack4(f); }
#elif CC_FWD_VEC == 2
typedef unsigned int cc_frow;
__device__ __forceinline__ cc_frow cc_frow_zero() { return 0u; }
__device__ __forceinline__ unsigned int cc_frow_word(cc_frow v, int) { return v; }
__device__ __forceinline__ cc_frow cc_frow_pack(const float* f) { return cc_pack2(f[0], f[1]); }
#else
#error "CC_FWD_VEC: 2 or 4"
#endif

// a row of x (or out) to float32: element j is channel j of the thread's
__device__ __forceinline__ void cc_fwd_unpack(cc_frow v, float* f) {
#pragma unroll
    for (int j = 0; j < CC_FWD_VEC; ++j) f[j] = cc_x_half(cc_frow_word(v, j >> 1), j & 1);
}

// CC_FWD_VEC consecutive weight-typed values from `p` (aligned to their vector: the launcher checks), as float32
__device__ __forceinline__ void cc_fwd_load_w(const cc_wt* __restrict__ p, float* f) {
#if CC_WT == 2 && CC_FWD_VEC == 4
    const float4 v = *reinterpret_cast<const float4*>(p);
    f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w;
#elif CC_WT == 2
    const float2 v = *reinterpret_cast<const float2*>(p);
    f[0] = v.x; f[1] = v.y;
#else
    const cc_frow v = *reinterpret_cast<const cc_frow*>(p);
#pragma unroll
    for (int j = 0; j < CC_FWD_VEC; ++j) {
        const unsigned int word = cc_frow_word(v, j >> 1);
#if CC_WT == 0
        f[j] = cc_bf16_half(word, j & 1);
#else
        f[j] = cc_half_to_float(j & 1 ? word >> 16 : word & 0xFFFFu);
#endif
    }
#endif
}

// The forward's only read of the mask: the value of step t (0 <= t < T) of row b as float32. A lane reads one
// mask value per 32 rows of its run (not one per row), so converting it here, before the vote, costs one
// conversion per lane and run whatever the type.
typedef cc_mask_t cc_fwd_mask_t;
__device__ __forceinline__ float cc_fwd_mask(const cc_fwd_mask_t* __restrict__ mask, int b, int T, int t) {
    return cc_mask_at(mask, (long long)b * T + t);
}

// one thread's run: where it reads and writes
struct CcFwdRun {
    const cc_frow* xb;  // x at (b, t = 0, the thread's channels)
    cc_frow* ob;        // out at (b, t = 0, the thread's channels)
    const cc_fwd_mask_t* mask;
    int xs, os;         // x's and out's strides over T in rows (compile-time constants where CC_D is set)
    int b, t0, T;
    bool active;        // the thread's channels exist (threads past D still take part in the warp's calls)
};

// The run's outputs from its loaded rows: row i converted when the window reaches it (so that only about W
// converted rows are live), output i - (W-1) formed at once. ONES: every mask value of the run is 1 (or there
// is no mask): no select, no multiply. INSIDE: the run and its halo lie in [0, T).
template <bool ONES, bool INSIDE>
__device__ __forceinline__ void cc_fwd_outputs(const CcFwdRun& a, const cc_frow (&raw)[CC_FWD_ROWS],
                                               const float (&mv)[CC_FWD_SLOTS],
                                               const float (&wk)[CC_W][CC_FWD_VEC], const float (&bs)[CC_FWD_VEC]) {
    constexpr int H = CC_W - 1, V = CC_FWD_VEC;
    float xf[CC_FWD_ROWS][V];
#pragma unroll
    for (int i = 0; i < CC_FWD_ROWS; ++i) {
        float f[V];
        cc_fwd_unpack(raw[i], f);
        if (ONES) {
#pragma unroll
            for (int j = 0; j < V; ++j) xf[i][j] = f[j];
        } else {  // by selection: a masked NaN or Inf contributes nothing
            const float m = __shfl_sync(CC_FWD_WARP, mv[i / 32], i % 32);
#pragma unroll
            for (int j = 0; j < V; ++j) xf[i][j] = m != 0.f ? f[j] * m : 0.f;
        }
        if (i < H) continue;
        const int r = i - H;  // row i is step t0 + r
        float o[V];
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] = bs[j];
#pragma unroll
        for (int k = 0; k < CC_W; ++k)
#pragma unroll
            for (int j = 0; j < V; ++j) o[j] = fmaf(wk[k][j], xf[r + k][j], o[j]);
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] = cc_activation(o[j]);
#if CC_RESIDUAL
        cc_fwd_unpack(raw[i], f);  // the unmasked x, converted again: fewer registers than keeping f live
                                   // through the taps (sm_90, fused W = 4: 64 against 70)
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] += f[j];
#endif
        if (a.active && (INSIDE || a.t0 + r < a.T)) a.ob[(long long)(a.t0 + r) * a.os] = cc_frow_pack(o);
    }
}

// a run: its loads, the mask vote, the weights, then the outputs of the path the vote chose
template <bool INSIDE>
__device__ __forceinline__ void cc_fwd_run(const CcFwdRun& a, const cc_wt* __restrict__ weight,
                                           const cc_wt* __restrict__ bias, int c) {
    constexpr int H = CC_W - 1, V = CC_FWD_VEC;
    cc_frow raw[CC_FWD_ROWS];
#pragma unroll
    for (int i = 0; i < CC_FWD_ROWS; ++i) {  // zeros before t = 0 (and past T: never stored)
        const int t = a.t0 - H + i;
        raw[i] = (a.active && (INSIDE || (t >= 0 && t < a.T))) ? a.xb[(long long)t * a.xs] : cc_frow_zero();
    }
    float mv[CC_FWD_SLOTS];  // lane l: the mask values of rows l, l + 32
    bool ones = true;        // the same for every warp of the block (they read the same mask values)
#if CC_HAS_MASK
    {
        const int lane = threadIdx.x & 31;
#pragma unroll
        for (int s = 0; s < CC_FWD_SLOTS; ++s) {  // rows outside [0, T) read x as 0: their value counts as 1
            const int i = 32 * s + lane, t = a.t0 - H + i;
            const bool read = i < CC_FWD_ROWS && (INSIDE || (t >= 0 && t < a.T));
            mv[s] = read ? cc_fwd_mask(a.mask, a.b, a.T, t) : 1.f;
            ones = ones && mv[s] == 1.f;
        }
        ones = __all_sync(CC_FWD_WARP, ones);
    }
#else
#pragma unroll
    for (int s = 0; s < CC_FWD_SLOTS; ++s) mv[s] = 1.f;
#endif
    float wk[CC_W][V], bs[V];
    {
        const long long cw = a.active ? c : 0;  // threads past D read channel 0's weights and store nothing
        float flat[V * CC_W];  // the thread's V channels' weights are V * W contiguous values
#pragma unroll
        for (int i = 0; i < CC_W; ++i) cc_fwd_load_w(weight + (cw * CC_W + i) * V, flat + V * i);
#pragma unroll
        for (int j = 0; j < V; ++j)
#pragma unroll
            for (int k = 0; k < CC_W; ++k) wk[k][j] = flat[j * CC_W + k];
#if CC_HAS_BIAS
        cc_fwd_load_w(bias + cw * V, bs);
#else
#pragma unroll
        for (int j = 0; j < V; ++j) bs[j] = 0.f;
#endif
    }
#if CC_HAS_MASK
    if (!ones) {  // block-uniform (every warp voted on the same values): no divergence
        cc_fwd_outputs<false, INSIDE>(a, raw, mv, wk, bs);
        return;
    }
#endif
    cc_fwd_outputs<true, INSIDE>(a, raw, mv, wk, bs);
}

// out[b, t, c] = (x[b, t, c] if residual) + act(bias[c] + sum_k w[c, k] * xm[b, t - (W-1) + k, c]), where
// xm = x (times the mask where it is non-zero, 0 where it is 0), zeros before t = 0.
// grid (ceil(T / CC_FWD_RUN), ceil(Dv / CC_BTD_FWD_THREADS), B), block CC_BTD_FWD_THREADS. Dv = D / CC_FWD_VEC;
// x and out strides over B and T in units of CC_FWD_VEC elements (unused where CC_D is set: then x and out are
// contiguous [B, T, CC_D]); weight [D, W] contiguous; mask [B, T] contiguous, of CC_MASK_T's type (a stand-in
// pointer when CC_HAS_MASK is 0).
extern "C" __global__ void __launch_bounds__(CC_BTD_FWD_THREADS) cc_conv_fwd_btd(
        const cc_frow* __restrict__ x, const cc_wt* __restrict__ weight, const cc_wt* __restrict__ bias,
        const cc_fwd_mask_t* __restrict__ mask, cc_frow* __restrict__ out, int T, int Dv, int x_stride_b,
        int x_stride_t, int out_stride_b, int out_stride_t) {
    const int c = blockIdx.y * CC_BTD_FWD_THREADS + threadIdx.x, b = blockIdx.z;
    CcFwdRun a;
#if CC_D
    a.xs = a.os = CC_D / CC_FWD_VEC;
    const long long row = (long long)b * T * (CC_D / CC_FWD_VEC);
    a.xb = x + row + c;
    a.ob = out + row + c;
#else
    a.xs = x_stride_t;
    a.os = out_stride_t;
    a.xb = x + (long long)b * x_stride_b + c;
    a.ob = out + (long long)b * out_stride_b + c;
#endif
    a.mask = mask;
    a.b = b;
    a.t0 = blockIdx.x * CC_FWD_RUN;
    a.T = T;
    a.active = c < Dv;
#if !CC_HAS_MASK
    if (!a.active) return;  // no warp-wide calls follow
#endif
#if CC_FWD_INSIDE
    if (a.t0 >= CC_W - 1 && a.t0 + CC_FWD_RUN <= T) {  // block-uniform
        cc_fwd_run<true>(a, weight, bias, c);
        return;
    }
#endif
    cc_fwd_run<false>(a, weight, bias, c);
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
// its own float32 partial rows, dw_part[(chunk index * B + b) * D + d][0..W] (W: bias), which
// cc_reduce_partials (conv_bdt.cu) sums in a fixed order.
// grid (chunks, ceil(Dv / CC_BTD_THREADS), B), block CC_BTD_THREADS; Dv = D / CC_BWD_VEC; strides in units
// of CC_BWD_VEC elements.
// The launcher's defines of this kernel alone (causal_conv1d_mps/cuda/_source.py, KERNEL_DEFINES):
//   CC_BWD_VEC     channels per thread: 2 (one 4-byte word per row) or 4 (8 bytes)
//   CC_BWD_RUN     rows per batch
//   CC_BWD_INSIDE  1: a chunk whose streamed rows (its W-1 rows before, and every row of its batches, the
//                  last batch whole) all lie in [0, T) takes a copy of the code without bounds checks
//                  (block-uniform: every chunk but the first and the last of a row, where T is long enough),
//                  and its middle batches (all rows in the chunk's dweight rows and dx rows) a copy without
//                  the row checks either
//   CC_BWD_D       D itself where x, dout and dx are contiguous [B, T, D]: rows are one base address plus
//                  constant offsets; 0: the strides are arguments
// The arithmetic and its order are the same in every variant: they give the same bits.

#if CC_BWD_VEC == 4
typedef uint2 cc_bvec;
__device__ __forceinline__ cc_bvec cc_bzero() { return make_uint2(0u, 0u); }
__device__ __forceinline__ void cc_bunpack(cc_bvec v, float* f) {
    f[0] = cc_x_half(v.x, 0);
    f[1] = cc_x_half(v.x, 1);
    f[2] = cc_x_half(v.y, 0);
    f[3] = cc_x_half(v.y, 1);
}
__device__ __forceinline__ cc_bvec cc_bpack(const float* f) { return cc_pack4(f); }
#elif CC_BWD_VEC == 2
typedef unsigned int cc_bvec;
__device__ __forceinline__ cc_bvec cc_bzero() { return 0u; }
__device__ __forceinline__ void cc_bunpack(cc_bvec v, float* f) {
    f[0] = cc_x_half(v, 0);
    f[1] = cc_x_half(v, 1);
}
__device__ __forceinline__ cc_bvec cc_bpack(const float* f) { return cc_pack2(f[0], f[1]); }
#else
#error "CC_BWD_VEC: 2 or 4"
#endif

#define CC_BWD_WIN (CC_W - 1 + CC_BWD_RUN)  // a window's rows: the W-1 carried over, then a batch

// one thread's chunk: where it reads and writes
struct CcBwdChunk {
    const cc_bvec* xb;  // x at (b, t = 0, the thread's channels)
    const cc_bvec* gb;  // dout at (b, t = 0, ...)
    cc_bvec* dxb;       // dx at (b, t = 0, ...)
    const cc_mask_t* mb;  // the mask's row b
    int xs, gs, ds;     // x's, dout's and dx's strides over T in vectors (compile-time constants where CC_BWD_D
                        // is set)
    int t0, t1, T;      // the chunk [t0, t1) of a row of T steps
    int end;            // min(t1 + W-1, T): rows from there on have g = 0 and no dx (not streamed)
};

// One batch: rows [u, u + R). INSIDE: its rows lie in [0, T); CHECKS: some of its rows may lie outside the
// chunk's dweight rows [t0, t1) or its dx rows lie outside [t0, t1) (a batch of the middle of a chunk inside
// [0, T) has neither: u >= t0 + H and u + R <= t1).
template <bool INSIDE, bool CHECKS>
__device__ __forceinline__ void cc_bwd_batch(const CcBwdChunk& a, int u, const float (&wk)[CC_W][CC_BWD_VEC],
                                             const float (&bs)[CC_BWD_VEC], float (&xm)[CC_BWD_WIN][CC_BWD_VEC],
                                             float (&gw)[CC_BWD_WIN][CC_BWD_VEC], float (&mw)[CC_BWD_WIN],
                                             cc_bvec (&go)[CC_BWD_WIN], float (&adw)[CC_W + 1][CC_BWD_VEC]) {
    constexpr int H = CC_W - 1, R = CC_BWD_RUN, V = CC_BWD_VEC;
    cc_bvec rx[R];
    float rm[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {  // every load of the batch first
        const int t = u + i;
        const bool inside = INSIDE || t < a.end;
        rx[i] = inside ? a.xb[(long long)t * a.xs] : cc_bzero();
        go[H + i] = inside ? a.gb[(long long)t * a.gs] : cc_bzero();
#if CC_HAS_MASK
        rm[i] = inside ? cc_mask_at(a.mb, t) : 0.f;
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
            gw[H + i][j] = (INSIDE || t < a.T) ? cc_activation_grad(pre, gf[j]) : 0.f;
        }
        if (!CHECKS || t < a.t1) {  // an output row of this chunk: its share of dweight and dbias
#pragma unroll
            for (int j = 0; j < V; ++j) {
#pragma unroll
                for (int k = 0; k < CC_W; ++k) adw[k][j] = fmaf(gw[H + i][j], xm[i + k][j], adw[k][j]);
                adw[CC_W][j] += gw[H + i][j];
            }
        }
        const int s = t - H;  // every g that reads x[s] is known now
        if (!CHECKS || (s >= a.t0 && s < a.t1)) {
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
            a.dxb[(long long)s * a.ds] = cc_bpack(o);
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

// The chunk's gradients: dx of rows [t0, t1) written, the float32 dweight / dbias terms of g[t0, t1) returned in
// adw. INSIDE: every row the chunk streams lies in [0, T) (the kernel checks): no bounds checks.
template <bool INSIDE>
__device__ __forceinline__ void cc_bwd_chunk(const CcBwdChunk& a, const float (&wk)[CC_W][CC_BWD_VEC],
                                             const float (&bs)[CC_BWD_VEC], float (&adw)[CC_W + 1][CC_BWD_VEC]) {
    constexpr int H = CC_W - 1, R = CC_BWD_RUN, N = CC_BWD_WIN, V = CC_BWD_VEC;
    const int t0 = a.t0, t1 = a.t1;
    // windows over rows [u - H, u + R) of the batch starting at row u: the first H carry over
    float xm[N][V], gw[N][V], mw[N];  // masked x, g, mask
    cc_bvec go[N];                     // raw dout, for the residual
#pragma unroll
    for (int i = 0; i < H; ++i) {  // the H rows before the chunk: masked x only (their g is never read)
        const int t = t0 - H + i;
        const bool inside = INSIDE || t >= 0;
        const cc_bvec raw = inside ? a.xb[(long long)t * a.xs] : cc_bzero();
#if CC_HAS_MASK
        const float m = inside ? cc_mask_at(a.mb, t) : 0.f;
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
    // INSIDE: the last batch's rows past t1 + H - 1 lie before T too and are read; they reach neither dweight
    // (t >= t1) nor dx (s >= t1) nor an earlier row.
    for (int u = t0; u < t1 + H; u += R) {
        if (INSIDE && u >= t0 + H && u + R <= t1)  // block-uniform
            cc_bwd_batch<INSIDE, false>(a, u, wk, bs, xm, gw, mw, go, adw);
        else
            cc_bwd_batch<INSIDE, true>(a, u, wk, bs, xm, gw, mw, go, adw);
    }
}

extern "C" __global__ void __launch_bounds__(CC_BTD_THREADS) cc_conv_bwd_btd(
        const cc_bvec* __restrict__ x, const cc_wt* __restrict__ weight, const cc_wt* __restrict__ bias,
        const cc_mask_t* __restrict__ mask, const cc_bvec* __restrict__ dout, cc_bvec* __restrict__ dx,
        float* __restrict__ dw_part, int T, int Dv, int chunk, int B, int x_stride_b, int x_stride_t,
        int dout_stride_b, int dout_stride_t, int dx_stride_b, int dx_stride_t) {
    constexpr int H = CC_W - 1, R = CC_BWD_RUN, V = CC_BWD_VEC;
    const int c = blockIdx.y * CC_BTD_THREADS + threadIdx.x, b = blockIdx.z;
    if (c >= Dv) return;
    CcBwdChunk a;
#if CC_BWD_D
    a.xs = a.gs = a.ds = CC_BWD_D / CC_BWD_VEC;
    const long long row = (long long)b * T * (CC_BWD_D / CC_BWD_VEC) + c;
    a.xb = x + row;
    a.gb = dout + row;
    a.dxb = dx + row;
#else
    a.xs = x_stride_t;
    a.gs = dout_stride_t;
    a.ds = dx_stride_t;
    a.xb = x + (long long)b * x_stride_b + c;
    a.gb = dout + (long long)b * dout_stride_b + c;
    a.dxb = dx + (long long)b * dx_stride_b + c;
#endif
    a.mb = mask + (long long)b * T;
    a.t0 = blockIdx.x * chunk;
    a.t1 = min(a.t0 + chunk, T);
    a.T = T;
    a.end = min(a.t1 + H, T);
    float wk[CC_W][V], bs[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {  // once per chunk: scalar loads (2W values need not be vector-aligned)
#pragma unroll
        for (int k = 0; k < CC_W; ++k) wk[k][j] = cc_w_to_float(weight[((long long)c * V + j) * CC_W + k]);
        bs[j] = CC_HAS_BIAS ? cc_w_to_float(bias[(long long)c * V + j]) : 0.f;
    }
    float adw[CC_W + 1][V];
#pragma unroll
    for (int k = 0; k <= CC_W; ++k)
#pragma unroll
        for (int j = 0; j < V; ++j) adw[k][j] = 0.f;
#if CC_BWD_INSIDE
    // the rows streamed: [t0 - H, t0 + span), span = the chunk and its H rows after, in whole batches
    const long long span = ((long long)chunk + H + R - 1) / R * R;
    if (a.t0 >= H && a.t0 + span <= T)  // block-uniform; then t1 = t0 + chunk
        cc_bwd_chunk<true>(a, wk, bs, adw);
    else
#endif
        cc_bwd_chunk<false>(a, wk, bs, adw);
    float* p = dw_part + (((long long)blockIdx.x * B + b) * Dv + c) * V * (CC_W + 1);
#pragma unroll
    for (int j = 0; j < V; ++j)
#pragma unroll
        for (int k = 0; k <= CC_W; ++k) p[j * (CC_W + 1) + k] = adw[k][j];
}

#endif  // CC_BWD_VEC
