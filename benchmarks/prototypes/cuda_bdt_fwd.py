"""Prototype for issue #12 (P1, P6): variants of the CUDA C++ (B,D,T) forward `cc_conv_fwd_bdt`, timed beside
the shipped kernel (through the public `causal_conv1d_mps.causal_conv1d`) in one run, as % of a device copy.

    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_bdt_fwd.py --json out.json   # an NVIDIA GPU: the sweep
    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_bdt_fwd.py --check           # no GPU: cuda_harness
    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_bdt_fwd.py --check --plant-bug   # must FAIL
    NVRTC_LIB=.../libnvrtc.so PYTHONPATH=$PWD python benchmarks/prototypes/cuda_bdt_fwd.py --ptx DIR  # no GPU
    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_bdt_fwd.py --dry-run   # the sweep's code on the CPU

Why: the shipped kernel gives each thread one 16-byte vector (8 steps) of one (b, d) row, 128 threads a
block, and loads W + 1 scalars (weights, bias) per thread for those 8 outputs. It reaches 92.0-92.8% of copy
at W = 4 (target 93%) and falls with W (67% at W = 11-12; target: within 15% of W = 4). It uses 32 registers
at every W (full occupancy), so the fall is not occupancy. Offline SASS counts (NVRTC 13.5 PTX, ptxas 13.0
sm_90, nvdisasm; no GPU) give the shipped kernel 20.6 / 25.4 / 29.2 / 35.8 / 43.1 instructions per output
at W = 4 / 7 / 9 / 12 / 16, against the 28-31 an H200 can issue per element at copy speed (132 SMs x 4
warp instructions a clock x 32 lanes at 1.75-1.98 GHz, over 4246 GB/s / 4 bytes): issue-bound from W of
about 9. Of those, W are FMAs and 5 SiLU; the rest is a per-thread fixed cost (the W + 1 weight loads with
their address arithmetic, the halo, indices) paid per 8 outputs. Four vectors per thread (`c4t128`) count
15.0 / 18.5 / 20.8 / 24.7 / 29.6 at W = 4 / 7 / 9 / 12 / 16; `lean` (the path of a block inside the row)
13.4 / - / 19.1 / 22.8 / 27.1; one `tanh.approx` for SiLU saves 2 more per output (`c4t128-lean-tanh`
11.4 / - / 17.1 / 20.8 / 25.1).

The variants (one templated body, `VARIANTS` below; every one computes the shipped contract: bias, SiLU,
zeros before t = 0, bf16 in/out, float32 arithmetic, T a multiple of 8, strided B/D rows of x and out):
- VPT vectors per thread, all loaded before any arithmetic: more bytes in flight, weights amortised.
  `contig`: a thread owns VPT consecutive vectors, the halo of all but the first is its own previous
  vector (each element converted once); a warp's load instruction then touches VPT x the lines.
  `strided`: vector j of a lane is `warp_base + 32 j + lane` (every load instruction coalesced); the halo
  comes from the lane below by a rotating shuffle, lane 0's from lane 31's previous vector.
- TPB threads per block; a block never spans two rows (grid (chunks per row, D, B), as shipped).
- `wsmem`: the W taps and the bias loaded once per block into shared memory (one global load per tap per
  block instead of per thread), read back as broadcast LDS.
- `ef`: x loaded by `ld.global.nc.L1::no_allocate.L2::cache_hint` with an L2 evict_first policy (and, with
  `efst`, stores with the same hint): the stream should not displace the halo lines other blocks re-read.
- `lean`: the taps' addresses as immediate offsets (weight [D, W] with tap stride 1, checked by the
  launcher) and, in blocks that lie wholly inside the row, loads without per-vector bounds predicates.
- `tanh`: SiLU as h + h tanh(h), h = pre / 2 (one `tanh.approx.f32`, one MUFU op instead of ex2 + rcp).
Inline PTX only where a GPU compiler reads the source (CC_PTX of common.cuh); cuda_harness takes the
portable branches. Nothing here is shipped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_T0 = time.perf_counter()  # --budget counts from here: importing torch and starting CUDA are part of a run

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from causal_conv1d_mps import _activation  # noqa: E402
from causal_conv1d_mps.cuda import _source  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    vpt: int  # 16-byte vectors (8 steps) per thread
    tpb: int  # threads per block
    strided: bool  # vector j of a lane: warp_base + 32 j + lane (True), or thread_base + j (False)
    cache: int = 0  # 0 plain loads/stores, 1 loads nc + L1::no_allocate + L2 evict_first, 2 stores too
    wsmem: bool = False
    tanh: bool = False
    lean: bool = False  # weights with tap stride 1 (compile-time offsets); unpredicated loads in full blocks

    def defines(self) -> dict[str, int]:
        return dict(PV_VPT=self.vpt, PV_TPB=self.tpb, PV_STRIDED=int(self.strided), PV_CACHE=self.cache,
                    PV_WSMEM=int(self.wsmem), PV_TANH=int(self.tanh),
                    PV_LEAN=int(self.lean))

    @property
    def kernel_name(self) -> str:
        return "pv_fwd_" + self.name.replace("-", "_")


VARIANTS = (  # the default sweep
    Variant("s1t128", 1, 128, True),  # the shipped design, rebuilt here: the control
    Variant("c2t128", 2, 128, False),
    Variant("c4t128", 4, 128, False),
    Variant("c8t64", 8, 64, False),
    Variant("s2t128", 2, 128, True),
    Variant("s4t128", 4, 128, True),
    Variant("c4t256", 4, 256, False),
    Variant("c4t128-wsmem", 4, 128, False, wsmem=True),
    Variant("c4t128-ef", 4, 128, False, cache=1),
    Variant("s4t128-ef", 4, 128, True, cache=1),
    Variant("c4t128-tanh", 4, 128, False, tanh=True),
    Variant("c4t128-tanh-ef", 4, 128, False, cache=1, tanh=True),
    Variant("c4t128-lean", 4, 128, False, lean=True),
    Variant("c4t128-lean-tanh", 4, 128, False, tanh=True, lean=True),
)
EXTRA = (  # checked too; timed only when named in --variants
    Variant("s4t256", 4, 256, True),
    Variant("s4t128-wsmem", 4, 128, True, wsmem=True),
    Variant("s4t128-tanh", 4, 128, True, tanh=True),
    Variant("c4t128-efst", 4, 128, False, cache=2),
    Variant("c8t64-tanh-ef", 8, 64, False, cache=1, tanh=True),
    Variant("s4t128-lean", 4, 128, True, lean=True),
    Variant("c8t64-lean-tanh", 8, 64, False, tanh=True, lean=True),
)
BY_NAME = {v.name: v for v in VARIANTS + EXTRA}

KERNEL = r"""
// ------------------------------------------------------------------ prototype: cuda_bdt_fwd.py
#define PV_HALO ((CC_W - 1 + 7) / 8)  // vectors of history a vector's outputs need (0 at W = 1)
#if PV_LEAN
#define PV_W_STRIDE_K 1  // the launcher checks weight.stride(1) == 1: the taps' addresses are immediate offsets
#else
#define PV_W_STRIDE_K w_stride_k
#endif
#if PV_LEAN
#define PV_FULL_OR(inside) (full || (inside))
#else
#define PV_FULL_OR(inside) (inside)
#endif

struct PvCache {
#if CC_PTX && PV_CACHE >= 1
    unsigned long long policy;
    __device__ __forceinline__ PvCache() {
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    }
#endif
};

// a vector of x: the stream (the hinted load of `ef`), or a halo vector another warp also reads (plain)
__device__ __forceinline__ uint4 pv_load_stream(const uint4* __restrict__ p, const PvCache& c) {
#if CC_PTX && PV_CACHE >= 1
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p), "l"(c.policy));
    return r;
#else
    return *p;
#endif
}

__device__ __forceinline__ void pv_store(uint4* __restrict__ p, uint4 v, const PvCache& c) {
#if CC_PTX && PV_CACHE >= 2
    asm volatile("st.global.L1::no_allocate.L2::cache_hint.v4.u32 [%0], {%1, %2, %3, %4}, %5;"
                 :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "l"(c.policy) : "memory");
#else
    *p = v;
#endif
}

__device__ __forceinline__ float pv_activation(float pre) {
#if PV_TANH && CC_ACTIVATION == CC_ACTIVATION_SILU
    const float h = 0.5f * pre;  // silu(p) = p sigmoid(p) = h (1 + tanh(h)), h = p / 2
#if CC_PTX
    float t;
    asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(h));
#else
    const float t = tanhf(h);
#endif
    return fmaf(h, t, h);
#else
    return cc_activation(pre);
#endif
}

__device__ __forceinline__ uint4 pv_shfl(uint4 v, int src) {
    return make_uint4(__shfl_sync(0xFFFFFFFFu, v.x, src), __shfl_sync(0xFFFFFFFFu, v.y, src),
                      __shfl_sync(0xFFFFFFFFu, v.z, src), __shfl_sync(0xFFFFFFFFu, v.w, src));
}

// vector v of row xr, zeros outside [0, n8): the halo's own loads (rare: a warp's edge lanes)
__device__ __forceinline__ uint4 pv_load_halo(const uint4* __restrict__ xr, int v, int n8) {
#if PV_BUG
    return make_uint4(0u, 0u, 0u, 0u);  // planted: the edge lanes' halo dropped (zeros instead of x)
#else
    return (v >= 0 && v < n8) ? xr[v] : make_uint4(0u, 0u, 0u, 0u);
#endif
}

// out[b, d, t] = act(bias[d] + sum_k w[d, k] x[b, d, t - (W-1) + k]), zeros before t = 0.
// grid (ceil(n8 / (PV_TPB * PV_VPT)), D, B), block PV_TPB; n8 = T / 8; strides in units of 8 elements.
__device__ __forceinline__ void pv_fwd_body(
        const uint4* __restrict__ x, const cc_wt* __restrict__ weight, const cc_wt* __restrict__ bias,
        uint4* __restrict__ out, int n8, int x_stride_b, int x_stride_d, int out_stride_b, int out_stride_d,
        int w_stride_d, int w_stride_k, int bias_stride) {
    const int d = blockIdx.y, b = blockIdx.z, lane = threadIdx.x & 31;
    const uint4* xr = x + (long long)b * x_stride_b + (long long)d * x_stride_d;
    uint4* orow = out + (long long)b * out_stride_b + (long long)d * out_stride_d;
    const PvCache cache;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

    // the thread's vectors: v0 + j * vstep
#if PV_STRIDED
    const int v0 = blockIdx.x * (PV_TPB * PV_VPT) + (threadIdx.x >> 5) * (32 * PV_VPT) + lane, vstep = 32;
#else
    const int v0 = blockIdx.x * (PV_TPB * PV_VPT) + threadIdx.x * PV_VPT, vstep = 1;
#endif
#if PV_LEAN
    const bool full = (blockIdx.x + 1) * (PV_TPB * PV_VPT) <= n8;  // every vector of the block inside the row
#endif
    uint4 raw[PV_VPT];
#pragma unroll
    for (int j = 0; j < PV_VPT; ++j) {  // every load first
        const int v = v0 + j * vstep;
#if PV_LEAN
        if (full) raw[j] = pv_load_stream(xr + v, cache); else  // block-uniform: no divergence
#endif
        raw[j] = v < n8 ? pv_load_stream(xr + v, cache) : zero;
    }

    float wk[CC_W], bs;
#if PV_WSMEM
    __shared__ __align__(16) float wsh[(CC_W + 1 + 3) / 4 * 4];  // taps, then the bias
    if (threadIdx.x < CC_W) {
        wsh[threadIdx.x] = cc_w_to_float(weight[(long long)d * w_stride_d + (long long)threadIdx.x * PV_W_STRIDE_K]);
    } else if (threadIdx.x == CC_W) {
#if CC_HAS_BIAS
        wsh[CC_W] = cc_w_to_float(bias[(long long)d * bias_stride]);
#else
        wsh[CC_W] = 0.f;
#endif
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < CC_W; ++k) wk[k] = wsh[k];
    bs = wsh[CC_W];
#else
#pragma unroll
    for (int k = 0; k < CC_W; ++k) wk[k] = cc_w_to_float(weight[(long long)d * w_stride_d + (long long)k * PV_W_STRIDE_K]);
#if CC_HAS_BIAS
    bs = cc_w_to_float(bias[(long long)d * bias_stride]);
#else
    bs = 0.f;
#endif
#endif

#if PV_STRIDED
    // halo[h-1][j]: vector (v0 + 32 j) - h. Lanes >= h take lane - h's vector j; lanes < h lane 32 + lane - h's
    // vector j - 1 (the same rotation of vector j - 1), and for j = 0 load it. Every lane shuffles.
    uint4 halo[PV_HALO > 0 ? PV_HALO : 1][PV_VPT];
#pragma unroll
    for (int h = 1; h <= PV_HALO; ++h) {
        uint4 rot_prev = lane < h ? pv_load_halo(xr, v0 - h, n8) : zero;  // lanes < h: the vector before j = 0
#pragma unroll
        for (int j = 0; j < PV_VPT; ++j) {
            const uint4 rot = pv_shfl(raw[j], (lane - h) & 31);
            halo[h - 1][j] = lane >= h ? rot : rot_prev;
            rot_prev = rot;
        }
    }
#pragma unroll
    for (int j = 0; j < PV_VPT; ++j) {
        float xs[8 * PV_HALO + 8];  // the halo (oldest first), then vector j's own 8 steps
#pragma unroll
        for (int h = 1; h <= PV_HALO; ++h) cc_unpack8(halo[h - 1][j], xs + 8 * (PV_HALO - h));
        cc_unpack8(raw[j], xs + 8 * PV_HALO);
        float o[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            float acc = bs;
#pragma unroll
            for (int k = 0; k < CC_W; ++k) acc = fmaf(wk[k], xs[8 * PV_HALO + i - (CC_W - 1) + k], acc);
            o[i] = pv_activation(acc);
        }
        const int v = v0 + 32 * j;
        if (PV_FULL_OR(v < n8)) pv_store(orow + v, cc_pack8(o), cache);
    }
#else
    // before[m-1]: vector v0 - m, m = 1..PV_HALO: the lane ceil(m / VPT) below holds it at index
    // ceil(m / VPT) * VPT - m; the lanes below that distance load it.
    float xs[8 * PV_HALO + 8 * PV_VPT];  // one window: the halo, then the thread's VPT vectors
#pragma unroll
    for (int m = 1; m <= PV_HALO; ++m) {
        const int delta = (m + PV_VPT - 1) / PV_VPT, idx = delta * PV_VPT - m;
        uint4 p = pv_shfl(raw[idx], (lane - delta) & 31);
        if (lane < delta) p = pv_load_halo(xr, v0 - m, n8);
        cc_unpack8(p, xs + 8 * (PV_HALO - m));
    }
#pragma unroll
    for (int j = 0; j < PV_VPT; ++j) cc_unpack8(raw[j], xs + 8 * (PV_HALO + j));
#pragma unroll
    for (int j = 0; j < PV_VPT; ++j) {
        float o[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            float acc = bs;
#pragma unroll
            for (int k = 0; k < CC_W; ++k) acc = fmaf(wk[k], xs[8 * (PV_HALO + j) + i - (CC_W - 1) + k], acc);
            o[i] = pv_activation(acc);
        }
        const int v = v0 + j;
        if (PV_FULL_OR(v < n8)) pv_store(orow + v, cc_pack8(o), cache);
    }
#endif
}
"""

WRAPPER = r"""
extern "C" __global__ void __launch_bounds__(PV_TPB) {name}(
        const uint4* __restrict__ x, const cc_wt* __restrict__ weight, const cc_wt* __restrict__ bias,
        uint4* __restrict__ out, int n8, int x_stride_b, int x_stride_d, int out_stride_b, int out_stride_d,
        int w_stride_d, int w_stride_k, int bias_stride) {{
    pv_fwd_body(x, weight, bias, out, n8, x_stride_b, x_stride_d, out_stride_b, out_stride_d, w_stride_d,
                w_stride_k, bias_stride);
}}
"""


def source(variant: Variant, W: int, has_bias: bool = True, activation: int = _activation.SILU,
           bug: bool = False) -> str:
    """The full text of one variant: the shipped contract header and `common.cuh`, then this prototype."""
    contract = dict(CC_W=W, CC_X_BF16=1, CC_WT=0, CC_HAS_BIAS=int(has_bias), CC_ACTIVATION=activation)
    own = "".join(f"#define {k} {v}\n" for k, v in {**variant.defines(), "PV_BUG": int(bug)}.items())
    return (_source.header(contract, _source.FILE_NAME) + own + _source._text(_source.COMMON_FILE) + KERNEL
            + WRAPPER.format(name=variant.kernel_name))


def _vector_strides(t: torch.Tensor) -> tuple[int, int]:
    """Strides over B and D in units of 8 elements; T must be contiguous and the address 16-byte aligned."""
    assert t.stride(2) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0, (
        f"x/out: T contiguous, 16-byte aligned, B/D strides multiples of 8; got strides {t.stride()}")
    return t.stride(0) // 8, t.stride(1) // 8


def launch_args(variant: Variant, x, weight, bias, out) -> tuple[tuple, tuple, tuple]:
    """(grid, block, the integer arguments) of a launch on x `[B, D, T]` bf16, weight `[D, W]`, bias `[D]` or
    None, out `[B, D, T]`; the pointer arguments are x, weight, bias (weight when None), out."""
    B, D, T = x.shape
    assert T % 8 == 0, f"T: a multiple of 8, got {T}"
    n8 = T // 8
    assert not variant.lean or weight.stride(1) == 1, f"{variant.name}: weight [D, W] with tap stride 1"
    grid, block = (-(-n8 // (variant.tpb * variant.vpt)), D, B), (variant.tpb, 1, 1)
    ints = (n8, *_vector_strides(x), *_vector_strides(out), weight.stride(0), weight.stride(1),
            bias.stride(0) if bias is not None else 0)
    return grid, block, ints


def launch(kernel, variant: Variant, x, weight, bias, out) -> None:
    """out = the variant's forward (see `launch_args`); `kernel` as `torch.cuda._compile_kernel` returns it."""
    grid, block, ints = launch_args(variant, x, weight, bias, out)
    kernel(grid=grid, block=block, args=[x, weight, bias if bias is not None else weight, out, *ints])


def reference(x, weight, bias, silu: bool = True) -> torch.Tensor:
    """float64 `[B, D, T]`: act(bias + causal depthwise conv(x)), zeros before t = 0."""
    W = weight.shape[1]
    pre = F.conv1d(F.pad(x.double(), (W - 1, 0)), weight.double()[:, None, :],
                   None if bias is None else bias.double(), groups=x.shape[1])
    return pre * torch.sigmoid(pre) if silu else pre


def _strided(B: int, D: int, T: int, g: torch.Generator, device="cpu") -> torch.Tensor:
    """bf16 x `[B, D, T]` as a view with B/D strides that are not the dense ones (every other row of a padded
    buffer), 16-byte aligned."""
    base = torch.randn(B + 1, 2 * D + 1, T + 16, generator=g, device=device).to(torch.bfloat16)
    return base[1:, 1::2, 8:T + 8]


# ------------------------------------------------------------------ CPU check through cuda_harness
CHECK_WIDTHS = (1, 2, 4, 7, 9, 12, 16)
# (B, D, T): T = 8 (one vector), T < W, B = 1, D odd, and rows spanning several warps and blocks
CHECK_SHAPES = ((2, 3, 8), (1, 5, 16), (2, 3, 72), (1, 3, 2128))


def check(variants=VARIANTS, widths=CHECK_WIDTHS, shapes=CHECK_SHAPES, bug: bool = False, verbose=True) -> int:
    """Every variant against the float64 reference on the CPU; returns the number of failed cases."""
    import cuda_harness

    reason = cuda_harness.unavailable_reason()
    if reason:
        print(f"cuda_harness unavailable: {reason}")
        return 1
    failures = 0
    for W in widths:
        for variant in variants:
            # bias + SiLU everywhere; no bias and identity on the first shape (the other branch of the contract)
            for has_bias, act in ((True, _activation.SILU), (False, _activation.IDENTITY)):
                kernel = cuda_harness.compile_kernel(source(variant, W, has_bias, act, bug), variant.kernel_name)
                for n, (B, D, T) in enumerate(shapes if has_bias else shapes[:1]):
                    g = torch.Generator().manual_seed(1000 * W + T + n)
                    x = _strided(B, D, T, g) if n % 2 else torch.randn(B, D, T, generator=g).to(torch.bfloat16)
                    w = (torch.randn(W, D, generator=g) * W ** -0.5).to(torch.bfloat16).t()  # strided [D, W]
                    if variant.lean:  # its taps must be contiguous; D still strided (w[::2] of a [2D, W])
                        w = torch.repeat_interleave(w, 2, dim=0)[::2]
                    bias = (torch.randn(D, generator=g) * 0.5).to(torch.bfloat16) if has_bias else None
                    out = _strided(B, D, T, g) if n % 2 == 0 else torch.empty_like(x)
                    launch(kernel, variant, x, w, bias, out)
                    want = reference(x, w, bias, act == _activation.SILU)
                    # bf16 rounding to nearest: at most 2**-8 relative (float32 arithmetic adds ~1e-7)
                    bad = ((out.double() - want).abs() > 0.004 * want.abs() + 1e-5).sum().item()
                    failures += bad > 0
                    if verbose or bad:
                        print(f"{variant.name:14s} W{W:<2d} bias={int(has_bias)} act={act} B{B} D{D} T{T:<5d} "
                              f"strided-{'x' if n % 2 else 'out'}: {'ok' if not bad else f'FAIL ({bad} elements)'}",
                              flush=True)
    print(f"{failures} failed case(s)")
    return failures


# ------------------------------------------------------------------ PTX without a GPU
def ptx_only(out_dir: Path, variants=VARIANTS, widths=(4, 16)) -> int:
    """Each variant through NVRTC ($NVRTC_LIB) to PTX for sm_90, as the GPU run will compile it."""
    import cuda_fwd

    return cuda_fwd.write_ptx(out_dir, ((f"{v.name} W{W}", f"{v.kernel_name}_W{W}", source(v, W))
                                        for W in widths for v in variants))


# ------------------------------------------------------------------ the GPU sweep
SHAPES = ((4, 4096, 8192), (8, 2048, 4096))
# W = 4 first (P1), then the widths of P6 from the widest: a run cut by the time budget keeps what matters most
WIDTHS = (4, 16, 12, 9, 7, 10, 8, 2, 3, 5)


class _Compiler:
    """Every (variant, W) compiled by NVRTC on worker threads started at once, in the order the sweep uses them,
    so that compiling overlaps the timing; a worker makes the device current first (the module lives in its
    primary context). A failed background compile is retried on the calling thread, which then raises."""

    OPTIONS = ["--use_fast_math", "-std=c++17"]  # the shipped launcher's (causal_conv1d_mps/cuda/_runtime.py)

    def __init__(self, jobs: dict, workers: int):
        self.device = torch.cuda.current_device()
        self.jobs = jobs  # key -> (source, kernel name)
        self.pool = ThreadPoolExecutor(workers) if workers > 0 else None
        self.futures = {k: self.pool.submit(self._compile, *job) for k, job in jobs.items()} if self.pool else {}

    def _compile(self, text: str, name: str):
        torch.cuda.set_device(self.device)
        t0 = time.perf_counter()
        kernel = torch.cuda._compile_kernel(text, name, nvcc_options=self.OPTIONS)
        return kernel, time.perf_counter() - t0

    def get(self, key):
        future = self.futures.get(key)
        if future is not None:
            try:
                return future.result()
            except Exception as exc:  # noqa: BLE001 - reported, then compiled again here
                print(f"background compile of {key} failed ({exc!r}); compiling on the main thread", flush=True)
        return self._compile(*self.jobs[key])

    def close(self):
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)


class _HarnessCompiler:
    """`_Compiler`'s interface on the CPU (`--dry-run`): cuda_harness, in line."""

    def __init__(self, jobs: dict):
        import cuda_harness

        self.jobs, self.compile = jobs, cuda_harness.compile_kernel

    def get(self, key):
        t0 = time.perf_counter()
        return self.compile(*self.jobs[key]), time.perf_counter() - t0

    def close(self):
        pass


def sweep(variants, widths, shapes, json_path: Path | None, budget_s: float, workers: int,
          dry_run: bool = False) -> int:
    """Time the shipped forward and every variant at each (shape, W) as % of a device copy; rows to `json_path`
    after each measurement. `dry_run`: the same code on CPU tensors through cuda_harness (wall-clock times,
    meaningless figures), to check this script before spending GPU time."""
    import causal_conv1d_mps as ccmps
    from causal_conv1d_mps.cuda import _runtime
    from causal_conv1d_mps.cuda import launch as shipped_launch

    start = _T0
    jobs = {(v.name, W): (source(v, W), v.kernel_name) for W in widths for v in variants}
    if dry_run:
        device, device_name, copy_gbs = "cpu", "cpu (dry run through cuda_harness)", 1.0
        compiler = _HarnessCompiler(jobs)

        def bench(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    else:
        import triton.testing

        import cuda_fwd

        device, device_name = "cuda", torch.cuda.get_device_name()
        compiler = _Compiler(jobs, workers)
        copy_gbs = cuda_fwd.copy_bandwidth()

        def bench(fn) -> float:
            return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")

    print(f"device {device_name}  torch {torch.__version__}  copy {copy_gbs:.0f} GB/s", flush=True)
    result = dict(device=device_name, torch=torch.__version__, copy_gbs=copy_gbs,
                  variants=[v.__dict__ for v in variants], rows=[], compile_s={}, skipped=[])

    def save():
        result["elapsed_s"] = time.perf_counter() - start
        if json_path:
            json_path.write_text(json.dumps(result, indent=1))

    for W in widths:
        for (B, D, T) in shapes:
            if time.perf_counter() - start > budget_s:
                result["skipped"].append(dict(B=B, D=D, T=T, W=W))
                print(f"skipped B{B} D{D} T{T} W{W}: past the {budget_s:.0f} s budget", flush=True)
                continue
            g = torch.Generator(device=device).manual_seed(W)
            x = torch.randn(B, D, T, device=device, generator=g).to(torch.bfloat16)
            w = (torch.randn(D, W, device=device, generator=g) * W ** -0.5).to(torch.bfloat16)
            bias = (torch.randn(D, device=device, generator=g) * 0.5).to(torch.bfloat16)
            pre = F.conv1d(F.pad(x.float(), (W - 1, 0)), w.float()[:, None, :], bias.float(), groups=D)
            want = pre * torch.sigmoid(pre)  # float32 reference: enough to judge bf16 outputs
            del pre
            nbytes = 2 * x.numel() * 2
            with torch.no_grad():
                shipped_out = ccmps.causal_conv1d(x, w, bias, "silu")

            def record(name, ms, got):
                err = ((got.float() - want).norm() / want.norm()).item()
                differ = (got != shipped_out).float().mean().item()  # share of outputs not bitwise the shipped
                pct = nbytes / (ms * 1e-3) / 1e9 / copy_gbs * 100
                result["rows"].append(dict(B=B, D=D, T=T, W=W, name=name, ms=ms, pct_copy=pct, rel_err=err,
                                           differ_from_shipped=differ))
                print(f"B{B} D{D} T{T} W{W:<2d} {name:16s} {ms:8.4f} ms {pct:6.1f}% of copy  rel err {err:.1e}"
                      f"  {100 * differ:5.2f}% differ", flush=True)
                save()

            with torch.no_grad():
                fn = lambda: ccmps.causal_conv1d(x, w, bias, "silu")  # noqa: E731
                record("shipped", bench(fn), shipped_out)  # (since v9 the shipped kernel is s2t128 / s4t128)
            out = torch.empty_like(x)
            for variant in variants:
                kernel, seconds = compiler.get((variant.name, W))
                result["compile_s"][f"{variant.name} W{W}"] = seconds
                # launched as the shipped launcher launches (`_runtime`'s prepared launch: integers packed once,
                # one driver call with the pointers), so that host time per call matches the shipped path's
                grid, block, ints = launch_args(variant, x, w, bias, out)
                plan = (_runtime._HarnessKernel(kernel) if dry_run
                        else _runtime._DriverKernel(kernel, torch.cuda.current_device())).prepare(grid, block, 4, ints)
                tensors = (x, w, bias, out)
                args = tuple(t.data_ptr() for t in tensors) if plan.takes_pointers else tensors
                run = lambda: plan.launch(*args)  # noqa: E731
                out.zero_()
                run()
                record(variant.name, bench(run), out)
            del x, out, want, shipped_out
    compiler.close()
    _table(result)
    save()
    return 0


def _table(result: dict) -> None:
    """% of copy: one line per (shape, W), one column per kernel."""
    seen = {r["name"] for r in result["rows"]}
    names = [n for n in ("shipped", "shipped-cuda", *(v["name"] for v in result["variants"])) if n in seen]
    cells = {(r["B"], r["D"], r["T"], r["W"], r["name"]): r["pct_copy"] for r in result["rows"]}
    keys = list(dict.fromkeys((r["B"], r["D"], r["T"], r["W"]) for r in result["rows"]))
    print("\n% of copy (" + f"{result['copy_gbs']:.0f} GB/s)")
    print(f"{'shape':22s}" + "".join(f"{n:>18s}" for n in names))
    for k in sorted(keys, key=lambda k: (k[:3], k[3])):
        print(f"B{k[0]} D{k[1]} T{k[2]} W{k[3]:<2d}".ljust(22)
              + "".join(f"{cells[(*k, n)]:18.1f}" if (*k, n) in cells else f"{'':18s}" for n in names))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="correctness on the CPU through cuda_harness, no GPU")
    p.add_argument("--plant-bug", action="store_true", help="with --check: drop the edge lanes' halo (must FAIL)")
    p.add_argument("--ptx", type=Path, help="compile every variant to PTX via $NVRTC_LIB into this folder (no GPU)")
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(BY_NAME)}")
    p.add_argument("--widths", help="comma-separated filter widths")
    p.add_argument("--budget", type=float, default=105.0, help="GPU sweep: start no new (shape, W) after these seconds from start-up")
    p.add_argument("--compile-workers", type=int, default=6, help="GPU sweep: NVRTC threads (0: compile in line)")
    p.add_argument("--dry-run", action="store_true",
                   help="the sweep's code on CPU tensors through cuda_harness at tiny shapes (figures meaningless)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.variants:
        variants = tuple(BY_NAME[n] for n in args.variants.split(","))
    else:  # every variant is checked; the default sweep times VARIANTS
        variants = VARIANTS if not (args.check or args.ptx) else VARIANTS + EXTRA
    if args.check:
        widths = tuple(int(w) for w in args.widths.split(",")) if args.widths else CHECK_WIDTHS
        failures = check(variants, widths, bug=args.plant_bug)
        return int(failures > 0)
    if args.ptx:
        return ptx_only(args.ptx, variants)
    widths = tuple(int(w) for w in args.widths.split(",")) if args.widths else WIDTHS
    if args.dry_run:
        return sweep(variants, widths, ((2, 3, 2128), (1, 5, 64)), args.json, args.budget, 0, dry_run=True)
    return sweep(variants, widths, SHAPES, args.json, args.budget, args.compile_workers)


if __name__ == "__main__":
    sys.exit(main())
