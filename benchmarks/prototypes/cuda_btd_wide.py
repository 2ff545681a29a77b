"""Prototype for issue #12 (P6, P2): variants of the channel-last CUDA C++ forward `[B, T, D]` that keep their
%copy as the filter widens, timed beside the shipped kernel (`cuda/kernels/conv_btd.cu`) in one run.

    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_btd_wide.py --json wide.json  # on an NVIDIA GPU
    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_btd_wide.py --check           # no GPU: every variant
                                                                                     # through cuda_harness
    NVRTC_LIB=.../libnvrtc.so PYTHONPATH=$PWD python benchmarks/prototypes/cuda_btd_wide.py --ptx DIR
                                                                  # no GPU: every kernel of the sweep to PTX
    NVRTC_LIB=.../libnvrtc.so CUDA_BIN=.../bin PYTHONPATH=$PWD python benchmarks/prototypes/cuda_btd_wide.py \
        --sass --widths 4 16       # no GPU: sm_90 SASS instructions per element (CUDA_BIN: cuobjdump, nvdisasm)
    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_btd_wide.py --rehearse  # no GPU: the sweep's code

The GPU sweep (W 2..16, fused with an HF mask and plain channel-last, B4 T8192 D4096 and B4 T2048 D4096
bf16) times each variant beside the shipped kernel, both through its launcher with the float32 mask the
variants take (`shipped-kernel`) and through the public functions (`shipped-api`, which converts the int64
mask first), as % of a device copy of the same run; each figure is ten launches in one CUDA graph, so host
time is out of it. The first shape times every variant of the width's plan, the second only the first
shape's five best at that width and op. It prints each kernel's registers and local (spill) bytes, a table
per shape and op, and stops starting new cases after `--budget` seconds (the JSON keeps what was measured).

Why: the shipped kernel gives each thread 4 channels x 8 steps, converts all 8 + W-1 rows to float32 before
the taps and holds 4 * W float weights; its %copy falls with W (fused: W 4 87%, W 8 64%, W 16 ~23%;
docs/PERF_NOTES.md, v8), which v8 put down to registers. Its sm_90 SASS (NVRTC 13, `--sass`) shows no spill
(126 registers at W 16) but 63 instructions per element at W 16 against 16 FMAs: NVVM keeps the weights
and rows packed as bf16 and converts them again at each tap (the `cvt` field below); at copy speed an H200
issues about 32 per element. Each variant here changes one of the shipped choices (the `Variant` fields),
on top of the shipped helpers (`common.cuh`: conversions, `cvt.rn.bf16x2` packing, SiLU), so that only
the scheme differs from the shipped kernel:
- `run`: steps per thread (the W-1 halo rows are loaded and converted again per run: (W-1)/run extra work);
- `vec`: channels per thread, 4 (8-byte rows) or 2 (4-byte rows: half the registers per row and per tap);
- `eager`: convert every row before the taps (the shipped scheme), or lazily as the window slides, so that
  only about W converted rows are live; `ahead` rows of loads are kept in flight ahead of the conversion
  (0: every load of the run issued first, as shipped);
- `wmode`: weights as float registers (shipped), as packed bf16 pairs in registers (unpacked per tap), or
  as float32 in shared memory read per tap (each thread reads only its own slots: no barrier);
- `mask` (fused op): 0 the shipped per-element `m != 0 ? x * m : 0`; 1 the row's words selected by
  `m != 0` then multiplied; 2 and 3 the mask values loaded once per warp (one per lane) and broadcast by
  shuffle, with one warp vote per run choosing a uniform branch (no divergence): where every mask value the
  run reads is 0 or 1 (an HF padding mask) mode 2 keeps the select and skips the multiply; where every one
  is 1 (all of an HF mask but the padded runs) mode 3 runs the plain conv; elsewhere both run mode 0;
- `act`: SiLU as shipped (`x / (1 + exp(-x))`, two MUFU operations) or `h + h * tanh.approx(h)`, h = x / 2
  (one; less accurate far in the negative tail: the GPU run prints each variant's error);
- `cvt`: bf16 -> float32 as plain C (shipped: the compiler may convert a value again at each use) or
  through asm statements it cannot duplicate (each weight and row element converted once);
- `dconst`: D compiled in (one kernel per D, as the plans are per shape already), so that every row of a
  run is one base address plus a constant offset: no address arithmetic per row (at W 16 the variant with
  cvt and dconst has 31 SASS instructions per element against the shipped scheme's 63);
- `inside`: a run whose steps and halo all lie in [0, T) (t0 >= W-1 and t0 + run <= T: all runs of a row
  but a few at its ends; block-uniform) takes a copy of the code with no bounds checks (25.8 per element at
  W 16).
Masking is by selection everywhere (a masked-out NaN/Inf contributes nothing); the residual adds the unmasked
x; zeros before t = 0; bf16 x, weights and bias, float32 arithmetic. Nothing here is shipped.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cuda_fwd  # noqa: E402

from causal_conv1d_mps import _activation  # noqa: E402
from causal_conv1d_mps.cuda import _source  # noqa: E402

KERNEL_NAME = "wide_fwd_btd"

# The kernel text; the shipped contract (CC_*) and common.cuh come before it, then the variant's WV_* defines.
KERNEL = r"""
#define WV_N (WV_RUN + CC_W - 1)                                   // rows a run reads: its halo and its steps
#define WV_A ((WV_AHEAD == 0 || WV_AHEAD > WV_N) ? WV_N : WV_AHEAD)  // rows of loads issued ahead
#define WV_SLOTS ((WV_N + 31) / 32)                                 // mask values per lane (mask mode 2)
#define WV_FULL 0xFFFFFFFFu
#define WV_GENERAL 0  // paths of the body: any mask values
#define WV_BINARY 1   // every mask value of the run is 0 or 1: select, no multiply
#define WV_ONES 2     // every mask value of the run is 1: no select, no multiply

#if WV_VEC == 4
typedef uint2 wv_row;  // one step of the thread's 4 channels
__device__ __forceinline__ wv_row wv_zero() { return make_uint2(0u, 0u); }
__device__ __forceinline__ unsigned int wv_word(wv_row v, int i) { return i == 0 ? v.x : v.y; }
__device__ __forceinline__ wv_row wv_keep(bool keep, wv_row v) {
    return make_uint2(keep ? v.x : 0u, keep ? v.y : 0u);
}
__device__ __forceinline__ wv_row wv_pack(const float* f) {
    return make_uint2(cc_pack2(f[0], f[1]), cc_pack2(f[2], f[3]));
}
#else
typedef unsigned int wv_row;  // one step of the thread's 2 channels
__device__ __forceinline__ wv_row wv_zero() { return 0u; }
__device__ __forceinline__ unsigned int wv_word(wv_row v, int) { return v; }
__device__ __forceinline__ wv_row wv_keep(bool keep, wv_row v) { return keep ? v : 0u; }
__device__ __forceinline__ wv_row wv_pack(const float* f) { return cc_pack2(f[0], f[1]); }
#endif

// the 16 bits of element e (0 <= e < WV_VEC) of a row
__device__ __forceinline__ unsigned int wv_bits(wv_row v, int e) {
    const unsigned int word = wv_word(v, e >> 1);
    return (e & 1) ? word >> 16 : word & 0xFFFFu;
}

// bf16 element e of a row to float32. With WV_CVT 1 the shift or mask is an asm statement: the compiler
// cannot derive the value again from the packed bits at each use (NVVM otherwise keeps weights and rows
// packed and converts them once per tap, about one extra instruction per FMA), so each is converted once.
__device__ __forceinline__ float wv_cvt(wv_row v, int e) {
#if CC_PTX && WV_CVT
    const unsigned int word = wv_word(v, e >> 1);
    float f;
    if (e & 1)
        asm("and.b32 %0, %1, 0xFFFF0000;" : "=f"(f) : "r"(word));
    else
        asm("shl.b32 %0, %1, 16;" : "=f"(f) : "r"(word));
    return f;
#else
    return cc_bf16_to_float(wv_bits(v, e));
#endif
}

__device__ __forceinline__ void wv_unpack(wv_row v, float* f) {
#pragma unroll
    for (int e = 0; e < WV_VEC; ++e) f[e] = wv_cvt(v, e);
}

__device__ __forceinline__ float wv_act(float pre) {
#if WV_ACT == 1
    const float h = 0.5f * pre;
#if CC_PTX
    float t;
    asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(h));
#else
    const float t = tanhf(h);
#endif
    return fmaf(h, t, h);  // silu(x) = x/2 * (1 + tanh(x/2))
#else
    return cc_activation(pre);
#endif
}

// ------------------------------------------------------------------ weights
struct WvWeights {
#if WV_WMODE == 0
    float w[CC_W][WV_VEC];            // float registers (shipped)
#elif WV_WMODE == 1
    unsigned int p[CC_W][WV_VEC / 2]; // bf16 pairs (channels 2q, 2q+1) per tap, unpacked per use
#else
    const float* s;                   // this thread's first slot in shared memory; tap k at s + k * TPB * VEC
#endif
    float bias[WV_VEC];
};

// the taps' weights of the thread's channels at tap k
__device__ __forceinline__ void wv_tap(const WvWeights& wt, int k, float* f) {
#if WV_WMODE == 0
#pragma unroll
    for (int j = 0; j < WV_VEC; ++j) f[j] = wt.w[k][j];
#elif WV_WMODE == 1
#pragma unroll
    for (int q = 0; q < WV_VEC / 2; ++q) {
        f[2 * q] = __uint_as_float(wt.p[k][q] << 16);
        f[2 * q + 1] = __uint_as_float(wt.p[k][q] & 0xFFFF0000u);
    }
#else
    const float* p = wt.s + k * (WV_TPB * WV_VEC);
#if WV_VEC == 4
    const float4 v = *reinterpret_cast<const float4*>(p);
    f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w;
#else
    const float2 v = *reinterpret_cast<const float2*>(p);
    f[0] = v.x; f[1] = v.y;
#endif
#endif
}

// ------------------------------------------------------------------ one run
struct WvRun {
    const wv_row* xb;  // x at (b, 0, the thread's channels)
    const float* mb;   // mask at (b, 0)
    wv_row* ob;        // out at (b, 0, the thread's channels)
    int t0, T, DV;
    bool active;       // the thread's channels exist (threads past D still take part in warp calls)
};

// row i of the run: step t0 - (W-1) + i; INSIDE: the whole run and its halo lie in [0, T) (no checks)
template <bool INSIDE>
__device__ __forceinline__ wv_row wv_load(const WvRun& a, int i) {
    const int t = a.t0 - (CC_W - 1) + i;
    return (a.active && (INSIDE || (t >= 0 && t < a.T))) ? a.xb[(long long)t * a.DV] : wv_zero();
}

template <bool INSIDE>
__device__ __forceinline__ float wv_load_mask(const WvRun& a, int i) {
    const int t = a.t0 - (CC_W - 1) + i;
    return (INSIDE || (t >= 0 && t < a.T)) ? a.mb[t] : 0.f;
}

// row i's mask value: loaded with the row (modes 0, 1) or broadcast from the lane that loaded it (2, 3)
__device__ __forceinline__ float wv_mask_of(const float (&m)[WV_N], const float (&mv)[WV_SLOTS], int i) {
#if WV_MASK >= 2
    return __shfl_sync(WV_FULL, mv[i / 32], i % 32);
#else
    return m[i];
#endif
}

// row bits -> the conv input in float32, masked by selection
template <int PATH>
__device__ __forceinline__ void wv_convert(wv_row v, float m, float* f) {
#if CC_HAS_MASK && WV_MASK == 1
    wv_unpack(wv_keep(m != 0.f, v), f);
#pragma unroll
    for (int j = 0; j < WV_VEC; ++j) f[j] *= m;
#elif CC_HAS_MASK
    float g[WV_VEC];
    wv_unpack(v, g);
#pragma unroll
    for (int j = 0; j < WV_VEC; ++j)
        f[j] = PATH == WV_ONES ? g[j] : m != 0.f ? (PATH == WV_BINARY ? g[j] : g[j] * m) : 0.f;
#else
    wv_unpack(v, f);
#endif
}

// output step r of the run from the converted rows r .. r + W-1
template <bool INSIDE>
__device__ __forceinline__ void wv_output(const WvRun& a, const WvWeights& wt, const float (&xf)[WV_N][WV_VEC],
                                          const wv_row (&raw)[WV_N], int r) {
    float acc[WV_VEC];
#pragma unroll
    for (int j = 0; j < WV_VEC; ++j) acc[j] = wt.bias[j];
#pragma unroll
    for (int k = 0; k < CC_W; ++k) {
        float w[WV_VEC];
        wv_tap(wt, k, w);
#pragma unroll
        for (int j = 0; j < WV_VEC; ++j) acc[j] = fmaf(w[j], xf[r + k][j], acc[j]);
    }
    float o[WV_VEC];
#pragma unroll
    for (int j = 0; j < WV_VEC; ++j) o[j] = wv_act(acc[j]);
#if CC_RESIDUAL
    float res[WV_VEC];
    wv_unpack(raw[r + CC_W - 1], res);  // the unmasked x
#pragma unroll
    for (int j = 0; j < WV_VEC; ++j) o[j] += res[j];
#endif
    if (a.active && (INSIDE || a.t0 + r < a.T)) a.ob[(long long)(a.t0 + r) * a.DV] = wv_pack(o);
}

// rows 0 .. WV_A-1 are loaded (and their mask values, modes 0 and 1); the rest of the run
template <int PATH, bool INSIDE>
__device__ __forceinline__ void wv_body(const WvRun& a, const WvWeights& wt, wv_row (&raw)[WV_N],
                                        float (&m)[WV_N], const float (&mv)[WV_SLOTS]) {
    constexpr int H = CC_W - 1;
    float xf[WV_N][WV_VEC];
#if WV_EAGER  // the shipped scheme: every row converted, then the taps
#pragma unroll
    for (int i = 0; i < WV_N; ++i) wv_convert<PATH>(raw[i], PATH == WV_ONES ? 1.f : wv_mask_of(m, mv, i), xf[i]);
#pragma unroll
    for (int r = 0; r < WV_RUN; ++r) wv_output<INSIDE>(a, wt, xf, raw, r);
#else  // lazily: row i converted when the window reaches it, output i - (W-1) formed at once
#pragma unroll
    for (int i = 0; i < WV_N; ++i) {
        if (i + WV_A < WV_N) {
            raw[i + WV_A] = wv_load<INSIDE>(a, i + WV_A);
#if CC_HAS_MASK && WV_MASK < 2
            m[i + WV_A] = wv_load_mask<INSIDE>(a, i + WV_A);
#endif
        }
        wv_convert<PATH>(raw[i], PATH == WV_ONES ? 1.f : wv_mask_of(m, mv, i), xf[i]);
        if (i >= H) wv_output<INSIDE>(a, wt, xf, raw, i - H);
    }
#endif
}

// a run: its loads, the mask vote (modes 2, 3), the weights, then the body of the path the vote chose
template <bool INSIDE>
__device__ __forceinline__ void wv_run(const WvRun& a, const cc_wt* __restrict__ weight,
                                       const cc_wt* __restrict__ bias, int c, float* ws) {
    wv_row raw[WV_N];
    float m[WV_N];
#pragma unroll
    for (int i = 0; i < WV_N; ++i) {  // loads first: predicated, no branch between them
        if (i < WV_A) raw[i] = wv_load<INSIDE>(a, i);
#if CC_HAS_MASK && WV_MASK < 2
        if (i < WV_A) m[i] = wv_load_mask<INSIDE>(a, i);
#else
        m[i] = 1.f;  // unused
#endif
    }
    float mv[WV_SLOTS];
#if CC_HAS_MASK && WV_MASK >= 2
    bool fast;  // the whole warp takes the fast path (every thread of a block reads the same mask values)
    {   // lane l holds the mask value of rows l, l + 32, ...; rows outside [0, T) read x as 0 and count as 1
        const int lane = threadIdx.x & 31;
        bool ok = true;
#pragma unroll
        for (int s = 0; s < WV_SLOTS; ++s) {
            const int i = 32 * s + lane, t = a.t0 - (CC_W - 1) + i;
            mv[s] = (i < WV_N && (INSIDE || (t >= 0 && t < a.T))) ? a.mb[t] : 1.f;
            ok = ok && (WV_MASK == 2 ? (mv[s] == 0.f || mv[s] == 1.f) : mv[s] == 1.f);
        }
        fast = __all_sync(WV_FULL, ok);
#ifdef WV_SASS_FAST_ONLY
        fast = true;  // --sass: the fast path alone, to count its instructions
#endif
    }
#else
#pragma unroll
    for (int s = 0; s < WV_SLOTS; ++s) mv[s] = 0.f;
#endif

    WvWeights wt;
    {   // the thread's VEC channels' weights are VEC * W contiguous values: W row-sized loads
        const wv_row* wr = reinterpret_cast<const wv_row*>(weight + (long long)(a.active ? c : 0) * WV_VEC * CC_W);
        wv_row flat[CC_W];
#pragma unroll
        for (int i = 0; i < CC_W; ++i) flat[i] = wr[i];
#if WV_WMODE == 2
        wt.s = ws + threadIdx.x * WV_VEC;
#endif
#pragma unroll
        for (int k = 0; k < CC_W; ++k) {
#pragma unroll
            for (int j = 0; j < WV_VEC; ++j) {
                const int e = j * CC_W + k;  // channel j, tap k
#if WV_WMODE == 0
                wt.w[k][j] = wv_cvt(flat[e / WV_VEC], e % WV_VEC);
#elif WV_WMODE == 1
                const unsigned int bits = wv_bits(flat[e / WV_VEC], e % WV_VEC);
                if (j & 1) wt.p[k][j / 2] |= bits << 16; else wt.p[k][j / 2] = bits;
#else
                ws[(k * WV_TPB + threadIdx.x) * WV_VEC + j] = wv_cvt(flat[e / WV_VEC], e % WV_VEC);  // own slots
#endif
            }
        }
        const wv_row bv = reinterpret_cast<const wv_row*>(bias)[a.active ? c : 0];
        wv_unpack(bv, wt.bias);
    }
#if CC_HAS_MASK && WV_MASK >= 2
    if (fast)
        wv_body<WV_MASK == 2 ? WV_BINARY : WV_ONES, INSIDE>(a, wt, raw, m, mv);
    else
#endif
        wv_body<WV_GENERAL, INSIDE>(a, wt, raw, m, mv);
}

// grid (ceil(T / RUN), ceil(DV / TPB), B), block TPB (a multiple of 32); DV = D / VEC; x, out [B, T, D]
// contiguous; weight [D, W], bias [D] contiguous; mask [B, T] float32 contiguous (a stand-in without a mask)
extern "C" __global__ void __launch_bounds__(WV_TPB WV_MINB_ARG) wide_fwd_btd(
        const wv_row* __restrict__ x, const cc_wt* __restrict__ weight, const cc_wt* __restrict__ bias,
        const float* __restrict__ mask, wv_row* __restrict__ out, int T, int DV) {
    const int c = blockIdx.y * WV_TPB + threadIdx.x, b = blockIdx.z;
    WvRun a;
    a.t0 = blockIdx.x * WV_RUN;
    a.T = T;
#if WV_DCONST
    a.DV = WV_DCONST;  // D / VEC known to the compiler: every row's address is the run's base plus a constant
#else
    a.DV = DV;
#endif
    a.active = c < DV;
    a.xb = x + (long long)b * T * DV + c;
    a.ob = out + (long long)b * T * DV + c;
    a.mb = mask + (long long)b * T;
#if !CC_HAS_MASK || WV_MASK < 2
    if (!a.active) return;  // no warp-level calls follow
#endif
#if WV_WMODE == 2
    __shared__ __align__(16) float ws[CC_W * WV_TPB * WV_VEC];
#else
    float* ws = nullptr;
#endif
#if WV_INSIDE  // a run whose steps and halo lie in [0, T) (block-uniform): no bounds checks at all
#ifdef WV_SASS_FAST_ONLY
    const bool inside = true;  // --sass: the checkless run alone
#else
    const bool inside = a.t0 >= CC_W - 1 && a.t0 + WV_RUN <= T;
#endif
    if (inside) {
        wv_run<true>(a, weight, bias, c, ws);
        return;
    }
#endif
    wv_run<false>(a, weight, bias, c, ws);
}
"""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel variant (see the module docstring for what each field changes)."""
    name: str
    vec: int = 4      # channels per thread: 4 or 2
    run: int = 8      # steps per thread
    tpb: int = 64     # threads per block, a multiple of 32
    ahead: int = 0    # rows of loads in flight ahead of the conversion; 0: every load first
    eager: bool = False  # every row converted before the taps (the shipped scheme; needs ahead 0)
    wmode: int = 0    # weights: 0 float registers, 1 packed bf16 pairs, 2 shared memory
    mask: int = 0     # 0 shipped select(x * m), 1 words selected then multiplied, 2 / 3: warp vote, a fast
    #                   path where every mask value of the run is 0 or 1 (2: select only) or 1 (3: plain conv)
    act: int = 0      # 0 shipped SiLU, 1 tanh.approx SiLU
    cvt: int = 1      # bf16 -> float32: 0 plain C (shipped), 1 asm statements (each value converted once)
    dconst: bool = False  # D compiled in (one kernel per D): row addresses are constant offsets of one base
    inside: bool = False  # runs inside [0, T) (all but the first and last of a row) without bounds checks
    minb: int = 0     # __launch_bounds__ minimum blocks per SM (0: none)

    def __post_init__(self):
        if self.vec not in (2, 4) or self.tpb % 32 or (self.eager and self.ahead):
            raise ValueError(f"variant {self.name}: vec 2 or 4, tpb a multiple of 32, eager only with ahead 0")


VARIANTS = {v.name: v for v in (
    Variant("eager-v4r8", eager=True, cvt=0),          # the shipped scheme, rebuilt here (control)
    Variant("eager-v4r4", run=4, eager=True, cvt=0),   # (a) run chosen per W
    Variant("eager-v4r16", run=16, eager=True, cvt=0),
    Variant("eager-v4r8-cvt", eager=True),             # the shipped scheme, each value converted once
    Variant("lazy-v4r8"),                              # (c) rows converted as the window slides, loads first
    Variant("lazy-v4r16", run=16),
    Variant("stream-v4r16a8", run=16, ahead=8),        # (c) with 8 rows of loads in flight ahead
    Variant("lazy-v2r16", vec=2, run=16, tpb=128),     # (b) 2 channels per thread, 4-byte rows
    Variant("lazy-v2r32", vec=2, run=32, tpb=128),
    Variant("stream-v2r32a16", vec=2, run=32, tpb=128, ahead=16),
    Variant("pack-v4r8", wmode=1),                     # (d) weights as packed bf16 pairs
    Variant("smem-v4r8", wmode=2),                     # (d) weights in shared memory, read per tap
    Variant("smem-v2r32a16", vec=2, run=32, tpb=128, ahead=16, wmode=2),
    Variant("lazy-v2r32-tanh", vec=2, run=32, tpb=128, act=1),  # one MUFU per output instead of two
    Variant("lazy-v4r8-dc", dconst=True),         # D compiled in: no address arithmetic per row
    Variant("lazy-v2r32-dc", vec=2, run=32, tpb=128, dconst=True),
    Variant("lazy-v4r8-dc-in", dconst=True, inside=True),  # and no bounds checks inside [0, T)
    Variant("lazy-v2r32-dc-in", vec=2, run=32, tpb=128, dconst=True, inside=True),
    # (e) the mask, fused op only
    Variant("lazy-v4r8-m1", mask=1),
    Variant("lazy-v4r8-m2", mask=2),
    Variant("lazy-v4r8-m3", mask=3),
    Variant("eager-v4r8-m3", eager=True, mask=3),
    Variant("eager-v4r16-m3", run=16, eager=True, mask=3),
    Variant("lazy-v2r16-m3", vec=2, run=16, tpb=128, mask=3),
    Variant("lazy-v2r32-m3", vec=2, run=32, tpb=128, mask=3),
    Variant("lazy-v4r8-m3-tanh", mask=3, act=1),
    Variant("lazy-v2r32-m3-tanh", vec=2, run=32, tpb=128, mask=3, act=1),
    Variant("lazy-v4r8-m3-dc", mask=3, dconst=True),
    Variant("lazy-v2r32-m3-dc", vec=2, run=32, tpb=128, mask=3, dconst=True),
    Variant("lazy-v4r8-m3-dc-in", mask=3, dconst=True, inside=True),
    Variant("lazy-v2r32-m3-dc-in", vec=2, run=32, tpb=128, mask=3, dconst=True, inside=True),
)}

MASK_ONLY = {name for name, v in VARIANTS.items() if v.mask}

# Which variants the GPU sweep times at each width (plus the shipped kernel, always); mask variants only for
# the fused op. Kept modest: every (variant, W, op) is one NVRTC compile.
SMALL = ("eager-v4r8", "eager-v4r16", "eager-v4r8-cvt", "lazy-v4r8", "lazy-v2r16", "lazy-v4r8-dc",
         "lazy-v4r8-dc-in", "lazy-v2r32-dc-in",
         "lazy-v4r8-m1", "lazy-v4r8-m2", "lazy-v4r8-m3", "eager-v4r16-m3", "lazy-v4r8-m3-tanh", "lazy-v4r8-m3-dc",
         "lazy-v4r8-m3-dc-in", "lazy-v2r32-m3-dc-in")
MID = ("eager-v4r8", "eager-v4r8-cvt", "lazy-v4r8", "stream-v4r16a8", "lazy-v2r32", "lazy-v4r8-dc", "lazy-v2r32-dc",
       "lazy-v4r8-dc-in", "lazy-v2r32-dc-in",
       "lazy-v4r8-m3", "lazy-v2r32-m3", "lazy-v4r8-m3-dc", "lazy-v4r8-m3-dc-in", "lazy-v2r32-m3-dc-in")
LARGE = ("eager-v4r4", "eager-v4r8", "eager-v4r8-cvt", "lazy-v4r8", "stream-v4r16a8", "lazy-v2r16", "lazy-v2r32",
         "stream-v2r32a16", "smem-v4r8", "lazy-v2r32-tanh", "lazy-v2r32-dc", "lazy-v2r32-dc-in",
         "lazy-v2r32-m3", "lazy-v2r32-m3-tanh", "lazy-v2r32-m3-dc", "lazy-v2r32-m3-dc-in")
TOP_AFTER_FIRST_SHAPE = 5  # shapes after the first time the shipped kernel and the first shape's 5 best there
WIDTHS = (2, 3, 4, 5, 6, 7, 8, 10, 12, 16)


def plan(W: int) -> tuple[str, ...]:
    """The variants the sweep times at width W."""
    return SMALL if W <= 4 else MID if W <= 8 else LARGE


SHAPES = ((4, 8192, 4096), (4, 2048, 4096))  # (B, T, D)


def source(v: Variant, W: int, has_mask: bool, residual: bool, D: int, fast_only: bool = False) -> str:
    """The full text: the shipped contract and helpers (bf16 x, weight, bias; SiLU), then the variant
    (compiled for this D where `v.dconst`, for any D otherwise)."""
    contract = dict(CC_W=W, CC_X_BF16=1, CC_WT=0, CC_HAS_BIAS=1, CC_ACTIVATION=_activation.SILU,
                    CC_HAS_MASK=int(has_mask), CC_MASK_T=0, CC_RESIDUAL=int(residual))
    defines = dict(WV_VEC=v.vec, WV_RUN=v.run, WV_TPB=v.tpb, WV_AHEAD=v.ahead, WV_EAGER=int(v.eager),
                   WV_WMODE=v.wmode, WV_MASK=v.mask if has_mask else 0, WV_ACT=v.act, WV_CVT=v.cvt,
                   WV_DCONST=D // v.vec if v.dconst else 0, WV_INSIDE=int(v.inside))
    lines = [f"#define {k} {val}" for k, val in defines.items()]
    lines.append(f"#define WV_MINB_ARG {', ' + str(v.minb) if v.minb else ''}")
    if fast_only:
        lines.append("#define WV_SASS_FAST_ONLY 1")
    return (_source.header(contract, "conv_btd.cu") + _source._text(_source.COMMON_FILE) + "\n".join(lines)
            + "\n" + KERNEL)


def launch(kernel, v: Variant, x, w, bias, mask, out):
    """x, out `[B, T, D]` bf16 contiguous (D a multiple of v.vec); w `[D, W]`, bias `[D]` bf16; mask `[B, T]`
    float32 or None."""
    B, T, D = x.shape
    dv = D // v.vec
    kernel(grid=(-(-T // v.run), -(-dv // v.tpb), B), block=(v.tpb, 1, 1),
           args=[x, w, bias, mask if mask is not None else x, out, T, dv])


def reference(x, w, bias, mask, residual):
    """float64 `[B, T, D]`: (x if residual) + silu(bias + conv(x masked by selection, times the mask)), by W
    shifted multiply-adds (on the CPU and on the GPU, where a float64 conv would be slow)."""
    xd = x.double()
    xm = xd if mask is None else torch.where(mask[:, :, None] != 0, xd * mask.double()[:, :, None], 0)
    W, T = w.shape[1], x.shape[1]
    xp = F.pad(xm, (0, 0, W - 1, 0))  # zeros before t = 0
    del xm
    pre = bias.double().expand_as(xd).clone()
    wd = w.double()
    for k in range(W):
        pre.add_(xp[:, k:k + T, :] * wd[:, k])
    del xp
    y = pre * torch.sigmoid(pre)
    return y.add_(xd) if residual else y


def _inputs(B, T, D, W, device, seed, soft_mask=False):
    """x, weight, bias and a float32 mask: row 0 left-padded (0 over its first max(1, T // 4) steps) and a
    0 inside row B-1; NaN and Inf at masked positions. `soft_mask`: values other than 0 and 1 in the last
    row (the general path of mask modes 2 and 3)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, T, D, device=device, generator=g).to(torch.bfloat16)
    w = (torch.randn(D, W, device=device, generator=g) * W ** -0.5).to(torch.bfloat16)
    bias = (torch.randn(D, device=device, generator=g) * 0.5).to(torch.bfloat16)
    mask = torch.ones(B, T, device=device)
    pad = max(1, T // 4)
    mask[0, :pad] = 0
    x[0, :pad, : D // 2] = float("nan")  # masked out: only their own outputs' residual may show them
    x[0, 0, -1] = float("inf")
    if T >= 3:
        mask[B - 1, T // 2] = 0  # inside a sequence: its neighbours' windows must skip it
        x[B - 1, T // 2, :] = float("nan")
    if soft_mask:
        mask[B - 1] *= 0.25 + 1.5 * torch.rand(T, device=device, generator=g)
    return x, w, bias, mask


def _compare(out, want):
    """(relative Frobenius error over the finite reference values, the worst error in bf16 units in the last
    place of the reference (values below 2**-10 count as 2**-10), NaN/Inf pattern equal)."""
    got = out.double()
    finite = torch.isfinite(want)
    same = torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    g, w = got[finite], want[finite]
    den = w.norm().item()
    err = (g - w).norm().item() / (den or 1.0)
    ulp = torch.exp2(torch.floor(torch.log2(w.abs().clamp_min(2.0 ** -10))) - 7)
    worst = ((g - w).abs() / ulp).max().item() if w.numel() else 0.0
    return err, worst, same


MAX_ULPS = 2.0  # --check: every finite output within 2 bf16 ulps of float64 (the harness's exp is libm's)
CHECK_WIDTHS = (2, 4, 7, 8, 12, 16)
CHECK_SHAPES = ((2, 13, 64), (1, 3, 40), (2, 37, 8), (1, 70, 260))  # T % run != 0, T < W, B = 1, D % 256


def check(names=None, widths=CHECK_WIDTHS, shapes=CHECK_SHAPES, masks=(False, True), verbose=True) -> int:
    """Every variant (or those `names`) on the CPU through cuda_harness at awkward sizes against float64, the
    fused op (mask, residual; binary and soft masks) and, where `masks` holds False and the variant is not a
    mask variant, the plain channel-last forward; 0 when all pass."""
    import cuda_harness

    reason = cuda_harness.unavailable_reason()
    if reason:
        print(f"cuda_harness unavailable: {reason}")
        return 1
    failures = runs = 0
    for name in names or VARIANTS:
        v = VARIANTS[name]
        for W in widths:
            for has_mask in (m for m in masks if m or not v.mask):
                for B, T, D in shapes:
                    if D % v.vec:
                        continue
                    kernel = cuda_harness.compile_kernel(source(v, W, has_mask, has_mask, D), KERNEL_NAME)
                    for soft in ((False, True) if has_mask else (False,)):
                        x, w, bias, mask = _inputs(B, T, D, W, "cpu", W + T + soft, soft)
                        m = mask if has_mask else None
                        if not has_mask:
                            x = torch.nan_to_num(x, nan=0.5, posinf=0.5)
                        out = torch.full_like(x, float("nan"))  # a step never written stays NaN
                        try:
                            launch(kernel, v, x, w, bias, m, out)
                        except RuntimeError as exc:  # the harness found a fault: out of bounds, a race, ...
                            print(f"{name} W{W} mask={int(has_mask)} B{B} T{T} D{D}: {exc}")
                            out.fill_(float("nan"))
                        err, worst, same = _compare(out, reference(x, w, bias, m, has_mask))
                        ok = worst <= MAX_ULPS and same  # float32 sums rounded once to bf16: within 1 ulp
                        failures += not ok
                        runs += 1
                        if verbose or not ok:
                            print(f"{name:20s} W{W:<2d} mask={int(has_mask)}{' soft' if soft else '     '} "
                                  f"B{B} T{T} D{D}: rel err {err:.1e}, worst {worst:.2f} ulp"
                                  f"{'' if same else ', NaN/Inf pattern differs'}"
                                  f" {'ok' if ok else 'FAIL'}", flush=True)
    print(f"{runs - failures} of {runs} runs pass")
    return int(failures > 0)


# ------------------------------------------------------------------ the GPU sweep
def _jobs(widths=WIDTHS, D=SHAPES[0][2], names=None):
    """(variant name, W, has_mask, D) of every kernel the sweep times (D matters to `dconst` variants): the
    plan's variants at each W, or those `names` at every W."""
    return [(name, W, has_mask, D) for W in widths for has_mask in (False, True) for name in (names or plan(W))
            if has_mask or name not in MASK_ONLY]


def _text(job) -> str:
    name, W, has_mask, D = job
    return source(VARIANTS[name], W, has_mask, has_mask, D)


def _compile_all(jobs):
    """({job: kernel}, {job: registers and local (spill) bytes}) for jobs (variant name, W, has_mask, D),
    compiled by NVRTC on a thread pool (NVRTC releases the GIL) and loaded on this thread. A job whose
    compile fails is reported and left out."""
    from torch.cuda import _utils

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    cc = f"{props.major}{props.minor}"
    opts = ["--use_fast_math", "-std=c++17"]  # as the shipped runtime

    def compile_one(job):
        try:
            got = _utils._nvrtc_compile(_text(job), KERNEL_NAME, compute_capability=cc, nvcc_options=list(opts))
            return got if isinstance(got, tuple) else (got, KERNEL_NAME)  # older torch: the image alone
        except Exception as exc:  # noqa: BLE001 - reported per job below
            return exc

    kernels = {}
    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            compiled = dict(zip(jobs, pool.map(compile_one, jobs)))
        for job, got in compiled.items():
            if isinstance(got, Exception):
                print(f"compile of {job} failed: {str(got).strip()[:2000]}")
                continue
            binary, mangled = got
            kernels[job] = _utils._cuda_load_module(binary, [mangled])[mangled]
    except (AttributeError, TypeError, ImportError) as exc:  # another torch's private API: the public way
        print(f"parallel compile unavailable ({exc!r}); compiling one at a time")
        for job in jobs:
            if job in kernels:
                continue
            try:
                kernels[job] = torch.cuda._compile_kernel(_text(job), KERNEL_NAME, nvcc_options=list(opts))
            except RuntimeError as err:
                print(f"compile of {job} failed: {str(err).strip()[:2000]}")
    libcuda = _utils._get_gpu_runtime_library()
    attrs = {}
    for job, k in kernels.items():
        vals = []
        for attr in (4, 3):  # CU_FUNC_ATTRIBUTE_NUM_REGS, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES
            out = ctypes.c_int(-1)
            libcuda.cuFuncGetAttribute(ctypes.byref(out), attr, k.func)
            vals.append(out.value)
        attrs[job] = dict(regs=vals[0], local_bytes=vals[1])
    return kernels, attrs


def ptx_only(out_dir: Path) -> int:
    """Every kernel of the sweep through NVRTC to PTX for sm_90 (no GPU: $NVRTC_LIB names the library, as
    cuda_fwd.py --ptx); 1 if any compile fails."""
    return cuda_fwd.write_ptx(out_dir, ((f"{job[0]} W{job[1]} mask={int(job[2])}",
                                         f"{job[0]}_W{job[1]}_{'fused' if job[2] else 'plain'}", _text(job))
                                        for job in _jobs()))


def sass_stats(names=None, widths=WIDTHS) -> int:
    """Per kernel of the sweep: sm_90 registers, local bytes, SASS instructions and FFMAs per output element
    (static counts; a mask-mode 2/3 or `inside` kernel holds several bodies: its fast path, without bounds
    checks where `inside`, is also compiled alone). Needs
    $NVRTC_LIB and $CUDA_BIN (a folder with cuobjdump and nvdisasm, e.g. from the nvidia-cuda-cuobjdump and
    nvidia-cuda-nvdisasm wheels); no GPU."""
    import collections
    import os
    import re
    import subprocess
    import tempfile

    lib = ctypes.CDLL(os.environ.get("NVRTC_LIB", "libnvrtc.so"))
    tools = Path(os.environ.get("CUDA_BIN", "."))
    opts = [b"--gpu-architecture=sm_90", b"--use_fast_math", b"-std=c++17"]  # as the shipped runtime, sm_90
    def compiled(text: bytes) -> bytes:
        prog, size = ctypes.c_void_p(), ctypes.c_size_t()
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), text, b"wide.cu", 0, None, None) == 0
        if lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)) != 0:
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(log.value.decode())
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        return cubin.raw

    def stats(cubin: bytes):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
            sass = subprocess.run([tools / "nvdisasm", "-c", f.name], capture_output=True, text=True,
                                  check=True).stdout
        ops = collections.Counter(m.group(2).split(".")[0] for m in re.finditer(
            r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass))
        regs, local = (re.search(rf"{key}:(\d+)", usage).group(1) for key in ("REG", "LOCAL"))
        return regs, local, sum(ops.values()), ops["FFMA"]

    for name, W, has_mask, D in _jobs(widths, names=names):
        v = VARIANTS[name]
        per = v.vec * v.run
        regs, local, total, ffma = stats(compiled(source(v, W, has_mask, has_mask, D).encode()))
        line = (f"{'fused' if has_mask else 'plain'} W{W:<2d} {name:20s} {regs:>3s} regs {local:>4s} B local "
                f"{total / per:5.1f} SASS/elem {ffma / per:5.1f} FFMA/elem")
        if (has_mask and v.mask >= 2) or v.inside:
            total_fast = stats(compiled(source(v, W, has_mask, has_mask, D, fast_only=True).encode()))[2]
            line += f"   fast path alone {total_fast / per:5.1f} SASS/elem"
        print(line, flush=True)
    return 0


def _timer(reps_per_graph: int = 10):
    """ms per call of `fn`: `reps_per_graph` calls captured in one CUDA graph (no host launch cost in the
    figure), median of `triton.testing.do_bench` over replays; plain calls if capture fails."""
    import triton.testing

    def timed(fn):
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(reps_per_graph):
                    fn()
            ms = triton.testing.do_bench(graph.replay, warmup=3, rep=20, return_mode="median")
            return ms / reps_per_graph, "graph"
        except RuntimeError as exc:
            print(f"  (graph capture failed: {str(exc).splitlines()[0]}; timing plain calls)")
            torch.cuda.synchronize()
            return triton.testing.do_bench(fn, warmup=3, rep=20, return_mode="median"), "plain"

    return timed


def _rehearsal_parts(jobs):
    """The CPU stand-ins of the sweep's device parts (`--rehearse`): a copy's GB/s, the kernels through
    cuda_harness (no register figures), wall-clock timing. The figures mean nothing; the plumbing runs."""
    import cuda_harness

    a = torch.randn(2**22, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    t = time.perf_counter()
    b.copy_(a)
    copy_gbs = 2 * a.numel() * 2 / (time.perf_counter() - t) / 1e9
    kernels = {job: cuda_harness.compile_kernel(_text(job), KERNEL_NAME) for job in jobs}
    attrs = {job: dict(regs=-1, local_bytes=-1) for job in jobs}

    def timed(fn):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3, "cpu-rehearsal"

    return copy_gbs, kernels, attrs, timed


def sweep(json_path: Path | None, budget_s: float, widths=WIDTHS, shapes=SHAPES, names=None,
          rehearse: bool = False) -> int:
    """The GPU sweep (module docstring). `rehearse`: on the CPU through cuda_harness (tiny shapes), to try
    the sweep's own code without a GPU."""
    import causal_conv1d_mps as ccmps
    from causal_conv1d_mps.cuda import launch_btd

    start = time.monotonic()
    if len({D for _, _, D in shapes}) != 1:
        raise ValueError(f"shapes: one D for all (the dconst variants compile it in), got {shapes}")
    jobs = _jobs(widths, shapes[0][2], names)
    if rehearse:
        device, device_name = "cpu", "CPU rehearsal through cuda_harness"
        copy_gbs, kernels, attrs, timed = _rehearsal_parts(jobs)
    else:
        device, device_name = "cuda", torch.cuda.get_device_name()
        copy_gbs = cuda_fwd.copy_bandwidth()
        kernels, attrs = _compile_all(jobs)
        timed = _timer()
    print(f"device {device_name}  torch {torch.__version__}  copy {copy_gbs:.0f} GB/s")
    print(f"{len(kernels)} of {len(jobs)} variants compiled in {time.monotonic() - start:.1f} s (with the copy)",
          flush=True)
    rows: list[dict] = []
    result = dict(copy_gbs=copy_gbs, device=device_name, torch=torch.__version__,
                  variants={n: dataclasses.asdict(v) for n, v in VARIANTS.items()}, rows=rows, complete=False)

    def save():
        if json_path:
            json_path.write_text(json.dumps(result, indent=1))

    def record(op, shape, W, name, fn, out_of, want, nbytes, extra=None):
        ms, how = timed(fn)
        err, worst, same = _compare(out_of(), want)
        pct = nbytes / (ms * 1e-3) / 1e9 / copy_gbs * 100
        rows.append(dict(op=op, B=shape[0], T=shape[1], D=shape[2], W=W, variant=name, ms=ms, pct_copy=pct,
                         rel_err=err, worst_ulps=worst, nan_inf_pattern_ok=same, timing=how, **(extra or {})))
        regs = f"{extra['regs']:3d} regs {extra['local_bytes']:4d} B local" if extra else " " * 20
        print(f"{op:6s} B{shape[0]} T{shape[1]} D{shape[2]} W{W:<2d} {name:20s} {ms:8.4f} ms {pct:6.1f}% "
              f"{regs}  err {err:.1e} {worst:5.1f} ulp{'' if same else ' NaN/Inf PATTERN DIFFERS'}", flush=True)

    for shape in shapes:
        B, T, D = shape
        for W in widths:
            for has_mask in (True, False):
                if time.monotonic() - start > budget_s:
                    print(f"time budget of {budget_s:.0f} s spent: stopping here (JSON has the rows so far)")
                    save()
                    summary(rows)
                    return 0
                op = "fused" if has_mask else "plain"
                x, w, bias, mask = _inputs(B, T, D, W, device, W)
                if not has_mask:
                    x = torch.nan_to_num(x, nan=0.5, posinf=0.5)
                m = mask if has_mask else None
                want = reference(x, w, bias, m, has_mask)
                nbytes = 2 * x.numel() * x.element_size()
                out = torch.empty_like(x)
                # the shipped kernel, through its launcher (float32 mask, as the variants) and the public API
                shipped = lambda: launch_btd.conv_fwd_btd(  # noqa: E731
                    x, w, bias, m, _activation.SILU, has_mask, out, allow_cpu=rehearse)
                if shipped():
                    record(op, shape, W, "shipped-kernel", shipped, lambda: out, want, nbytes)
                if has_mask:
                    am = mask.to(torch.int64)
                    api = lambda: ccmps.short_conv_fused(x, w, bias, am, activation=True)  # noqa: E731
                    api_out = lambda: ccmps.short_conv_fused(x, w, bias, am, activation=True)  # noqa: E731
                else:
                    xt = x.transpose(1, 2)
                    api = lambda: ccmps.causal_conv1d(xt, w, bias, "silu")  # noqa: E731
                    api_out = lambda: ccmps.causal_conv1d(xt, w, bias, "silu").transpose(1, 2)  # noqa: E731
                with torch.no_grad():
                    record(op, shape, W, "shipped-api", api, api_out, want, nbytes)
                chosen = names or plan(W)
                if shape != shapes[0] and not names:  # the first shape's best at this (op, W), to save time
                    first = [r for r in rows if (r["B"], r["T"], r["D"]) == shapes[0] and r["op"] == op
                             and r["W"] == W and not r["variant"].startswith("shipped")]
                    chosen = [r["variant"] for r in sorted(first, key=lambda r: -r["pct_copy"])]
                    chosen = chosen[:TOP_AFTER_FIRST_SHAPE] if chosen else plan(W)
                for name in chosen:
                    job = (name, W, has_mask, D)
                    if job not in kernels:
                        continue
                    v, k = VARIANTS[name], kernels[job]
                    out_v = torch.empty_like(x)
                    record(op, shape, W, name, lambda: launch(k, v, x, w, bias, m, out_v), lambda: out_v, want,
                           nbytes, attrs[job])
                del want
                save()
    result["complete"] = True
    result["seconds"] = time.monotonic() - start
    save()
    summary(rows)
    print(f"done in {result['seconds']:.1f} s")
    return 0


def summary(rows: list[dict]) -> None:
    """Per shape and op: %copy of every variant at every W (a row per variant, '-' where not timed), then
    the best variant per W and its ratio to the best W = 4 figure, shipped kernel included (P6: >= 0.85)."""
    for shape in dict.fromkeys((r["B"], r["T"], r["D"]) for r in rows):
        for op in ("fused", "plain"):
            sel = [r for r in rows if (r["B"], r["T"], r["D"]) == shape and r["op"] == op]
            if not sel:
                continue
            names = list(dict.fromkeys(r["variant"] for r in sel))
            widths = sorted({r["W"] for r in sel})
            pct = {(r["variant"], r["W"]): r["pct_copy"] for r in sel}
            base = max((p for (n, w), p in pct.items() if w == 4), default=None)
            print(f"\n{op} B{shape[0]} T{shape[1]} D{shape[2]}: % of copy")
            print(f"{'':20s}" + "".join(f"{'W' + str(W):>7s}" for W in widths))
            for name in names:
                print(f"{name:20s}" + "".join(f"{pct[(name, W)]:7.1f}" if (name, W) in pct else f"{'-':>7s}"
                                             for W in widths))
            best = {W: max((p, n) for (n, w), p in pct.items() if w == W and not n.startswith("shipped"))
                    for W in widths if any(w == W and not n.startswith("shipped") for n, w in pct)}
            print(f"{'best variant':20s}" + "".join(f"{best[W][0]:7.1f}" if W in best else f"{'-':>7s}"
                                                   for W in widths))
            if base:
                print(f"{'best / best W4':20s}" + "".join(f"{best[W][0] / base:7.2f}" if W in best
                                                              else f"{'-':>7s}" for W in widths))
            for W in widths:
                if W in best:
                    print(f"  W{W}: best {best[W][1]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="correctness on the CPU through cuda_harness, no GPU")
    p.add_argument("--variants", nargs="*", help="only these variants, at every width (default: --check all, "
                   "the sweep and --sass a plan per width)")
    p.add_argument("--widths", nargs="*", type=int, help="only these widths (default: --check 2 4 7 8 12 16, "
                   "the sweep 2 3 4 5 6 7 8 10 12 16)")
    p.add_argument("--ptx", type=Path, help="compile every kernel of the sweep to PTX into this folder (no GPU)")
    p.add_argument("--sass", action="store_true", help="sm_90 SASS statistics per kernel (no GPU; see sass_stats)")
    p.add_argument("--json", type=Path)
    p.add_argument("--rehearse", action="store_true",
                   help="the sweep's code on the CPU through cuda_harness, tiny shape (no GPU; figures mean nothing)")
    p.add_argument("--budget", type=float, default=105.0, help="GPU sweep: stop starting cases after this many s")
    args = p.parse_args(argv)
    if args.check:
        return check(args.variants, tuple(args.widths or CHECK_WIDTHS))
    if args.ptx:
        return ptx_only(args.ptx)
    if args.sass:
        return sass_stats(args.variants, tuple(args.widths or WIDTHS))
    if args.rehearse:
        return sweep(args.json, args.budget, tuple(args.widths or (4, 16)), ((2, 40, 256), (1, 19, 256)),
                     args.variants, True)
    return sweep(args.json, args.budget, tuple(args.widths or WIDTHS), names=args.variants)


if __name__ == "__main__":
    sys.exit(main())
