"""Prototype for issue #12, item 4: forward + backward as CUDA C++ compiled through NVRTC
(`torch.cuda._compile_kernel`), timed beside the shipped Triton kernels in one run.

    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_bwd.py            # on an NVIDIA GPU
    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_bwd.py --ptx DIR  # no GPU: compile to PTX only

bf16, SiLU, bias; the forward kernels are `cuda_fwd.py`'s. Two backward kernels, each recomputing the
pre-activation from `x` (nothing saved by the forward), with no scratch memory and one cross-thread
reduction of the weight gradient per block (the Triton backward's cost is its per-tile reductions):
- `bwd_bdt`: `[B, D, T]`, T contiguous: a block walks one (b, d) row, a thread 8 steps per pass; the
  steps before (x) and after (x, dout) come from the neighbouring lanes through shuffles. A thread
  recomputes dpre for its 8 rows and the W-1 after them (which the next lane also computes).
- `bwd_btd`: `[B, T, D]`, D contiguous (the fused op, with its float32 mask and residual): a thread owns
  4 channels and walks L consecutive steps once: the masked x window and the dpre window shift through
  registers, dx of step t-(W-1) is emitted at step t, and only the W-1 steps before and after its stretch
  are read twice.
Weight/bias gradients: float32 partial rows, summed by one `torch.sum` (a fixed order: deterministic).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_fwd  # noqa: E402

DSILU = r"""
__device__ __forceinline__ float dsilu(float pre, float g) {
    const float s = 1.f / (1.f + __expf(-pre));
    return g * s * (1.f + pre * (1.f - s));
}
__device__ __forceinline__ uint4 shfl_up4(uint4 v) {
    return make_uint4(__shfl_up_sync(0xFFFFFFFFu, v.x, 1), __shfl_up_sync(0xFFFFFFFFu, v.y, 1),
                      __shfl_up_sync(0xFFFFFFFFu, v.z, 1), __shfl_up_sync(0xFFFFFFFFu, v.w, 1));
}
__device__ __forceinline__ uint4 shfl_down4(uint4 v) {
    return make_uint4(__shfl_down_sync(0xFFFFFFFFu, v.x, 1), __shfl_down_sync(0xFFFFFFFFu, v.y, 1),
                      __shfl_down_sync(0xFFFFFFFFu, v.z, 1), __shfl_down_sync(0xFFFFFFFFu, v.w, 1));
}
"""

BWD_BDT = r"""
// grid (D, B), block 128: the block walks row (b, d) 1024 steps per pass. T % 8 == 0.
// dw_part [B, D, W+1] (row W: the bias gradient)
extern "C" __global__ void __launch_bounds__(128) bwd_bdt(const uint4* __restrict__ x,
        const bf16_t* __restrict__ w, const bf16_t* __restrict__ bias, const uint4* __restrict__ dout,
        uint4* __restrict__ dx, float* __restrict__ dw_part, int T, int D) {
    const int d = blockIdx.x, b = blockIdx.y, nv = T / 8, lane = threadIdx.x & 31;
    const long row = ((long)b * D + d) * nv;
    float wk[W];
#pragma unroll
    for (int k = 0; k < W; ++k) wk[k] = b2f(w[d * W + k]);
    const float bs = b2f(bias[d]);
    float adw[W + 1];
#pragma unroll
    for (int k = 0; k <= W; ++k) adw[k] = 0.f;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    for (int v0 = 0; v0 < nv; v0 += 128) {
        const int v = v0 + threadIdx.x;
        const bool ok = v < nv;
        const uint4 xc = ok ? x[row + v] : zero, gc = ok ? dout[row + v] : zero;
        uint4 xp = shfl_up4(xc), xn = shfl_down4(xc), gn = shfl_down4(gc);
        if (lane == 0) xp = (v > 0 && v <= nv) ? x[row + v - 1] : zero;
        if (lane == 31) {
            xn = v + 1 < nv ? x[row + v + 1] : zero;
            gn = v + 1 < nv ? dout[row + v + 1] : zero;
        }
        float xs[24], gs[16];
        unpack(xp, xs); unpack(xc, xs + 8); unpack(xn, xs + 16);
        unpack(gc, gs); unpack(gn, gs + 8);
        float dp[8 + W - 1];
#pragma unroll
        for (int i = 0; i < 8 + W - 1; ++i) {
            float pre = bs;
#pragma unroll
            for (int k = 0; k < W; ++k) pre = fmaf(wk[k], xs[8 + i - (W - 1) + k], pre);
            dp[i] = dsilu(pre, gs[i]);
        }
        float o[8];
#pragma unroll
        for (int s = 0; s < 8; ++s) {
            float acc = 0.f;
#pragma unroll
            for (int k = 0; k < W; ++k) acc = fmaf(wk[k], dp[s + W - 1 - k], acc);
            o[s] = acc;
        }
        if (ok) dx[row + v] = pack(o);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
#pragma unroll
            for (int k = 0; k < W; ++k) adw[k] = fmaf(dp[i], xs[8 + i - (W - 1) + k], adw[k]);
            adw[W] += dp[i];
        }
    }
    __shared__ float red[4][W + 1];
#pragma unroll
    for (int k = 0; k <= W; ++k) {
        float v = adw[k];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
        if (lane == 0) red[threadIdx.x >> 5][k] = v;
    }
    __syncthreads();
    if (threadIdx.x <= W)
        dw_part[((long)b * D + d) * (W + 1) + threadIdx.x] =
            red[0][threadIdx.x] + red[1][threadIdx.x] + red[2][threadIdx.x] + red[3][threadIdx.x];
}
"""

BWD_BTD = r"""
__device__ __forceinline__ void unpack4(uint2 v, float* f) {
    f[0] = b2f(v.x & 0xFFFFu); f[1] = b2f(v.x >> 16); f[2] = b2f(v.y & 0xFFFFu); f[3] = b2f(v.y >> 16);
}
__device__ __forceinline__ uint2 pack4(const float* f) {
    return make_uint2(f2b(f[0]) | (f2b(f[1]) << 16), f2b(f[2]) | (f2b(f[3]) << 16));
}
// grid (ceil(D/4 / 64), ceil(T / L), B), block 64; D % 4 == 0; L % R == 0.
// dw_part [B * gridDim.y, D, W+1]
extern "C" __global__ void __launch_bounds__(64) bwd_btd(const uint2* __restrict__ x,
        const bf16_t* __restrict__ w, const bf16_t* __restrict__ bias, const float* __restrict__ mask,
        const uint2* __restrict__ dout, uint2* __restrict__ dx, float* __restrict__ dw_part,
        int T, int D, int has_mask, int residual) {
    const int c = blockIdx.x * 64 + threadIdx.x, b = blockIdx.z, nc = D / 4, t0 = blockIdx.y * L;
    if (c >= nc) return;
    const long base = (long)b * T * nc + c;
    const float* mb = mask + (long)b * T;
    float wk[W][4], bs[4], xw[W][4], gw[W][4], adw[W + 1][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int k = 0; k < W; ++k) { wk[k][j] = b2f(w[(c * 4 + j) * W + k]); adw[k][j] = 0.f; gw[k][j] = 0.f; }
        bs[j] = b2f(bias[c * 4 + j]);
        adw[W][j] = 0.f;
    }
    // the masked x of the W-1 steps before the stretch (xw[W-1] is filled by each step)
#pragma unroll
    for (int k = 0; k < W - 1; ++k) {
        const int t = t0 - (W - 1) + k;
        float f[4] = {0.f, 0.f, 0.f, 0.f};
        float m = 0.f;
        if (t >= 0) { unpack4(x[base + (long)t * nc], f); m = has_mask ? mb[t] : 1.f; }
#pragma unroll
        for (int j = 0; j < 4; ++j) xw[k + 1][j] = m != 0.f ? f[j] * m : 0.f;
    }
    const int steps = min(L, T - t0) + (W - 1);
    for (int u0 = 0; u0 < L + W - 1; u0 += R) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int u = u0 + r, t = t0 + u;
            if (u >= steps) break;
            // shift the windows: xw[W-1], gw[W-1] become step t
#pragma unroll
            for (int k = 0; k < W - 1; ++k)
#pragma unroll
                for (int j = 0; j < 4; ++j) { xw[k][j] = xw[k + 1][j]; gw[k][j] = gw[k + 1][j]; }
            float f[4] = {0.f, 0.f, 0.f, 0.f}, g[4] = {0.f, 0.f, 0.f, 0.f};
            float m = 0.f;
            if (t < T) {
                unpack4(x[base + (long)t * nc], f);
                unpack4(dout[base + (long)t * nc], g);
                m = has_mask ? mb[t] : 1.f;
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                xw[W - 1][j] = m != 0.f ? f[j] * m : 0.f;
                float pre = bs[j];
#pragma unroll
                for (int k = 0; k < W; ++k) pre = fmaf(wk[k][j], xw[k][j], pre);
                gw[W - 1][j] = dsilu(pre, g[j]);  // 0 past T (g = 0)
            }
            if (u < L) {  // an output of this stretch: its share of dweight and dbias
#pragma unroll
                for (int j = 0; j < 4; ++j) {
#pragma unroll
                    for (int k = 0; k < W; ++k) adw[k][j] = fmaf(gw[W - 1][j], xw[k][j], adw[k][j]);
                    adw[W][j] += gw[W - 1][j];
                }
            }
            const int s = t - (W - 1);
            if (u >= W - 1 && s < T) {  // every dpre that reads x[s] is known: dx[s]
                float o[4], gs[4] = {0.f, 0.f, 0.f, 0.f};
                const float ms = has_mask ? mb[s] : 1.f;
                if (residual) unpack4(dout[base + (long)s * nc], gs);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    float acc = 0.f;
#pragma unroll
                    for (int k = 0; k < W; ++k) acc = fmaf(wk[k][j], gw[W - 1 - k][j], acc);
                    o[j] = (ms != 0.f ? acc * ms : 0.f) + gs[j];
                }
                dx[base + (long)s * nc] = pack4(o);
            }
        }
    }
    float* p = dw_part + (((long)b * gridDim.y + blockIdx.y) * D + c * 4) * (W + 1);
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int k = 0; k <= W; ++k) p[j * (W + 1) + k] = adw[k][j];
}
"""


def source(kind: str, W: int, L: int = 128, R: int = 8) -> str:
    head = f"#define W {W}\n#define L {L}\n#define R {R}\n" + cuda_fwd.COMMON + DSILU
    return head + (BWD_BDT if kind == "bdt" else BWD_BTD)


def ptx_only(out_dir: Path) -> int:
    return cuda_fwd.write_ptx(out_dir, ((f"bwd {kind} W{W}", f"bwd_{kind}_W{W}", source(kind, W))
                                        for kind, W in (("bdt", 4), ("btd", 4), ("bdt", 8), ("btd", 8))))


def reference(x_bdt, w, bias, mask, residual, dout_bdt):
    """float64 forward + backward of `residual*x + silu(bias + conv(x masked))` over `[B, D, T]`."""
    x = x_bdt.double().requires_grad_(True)
    wd = w.double().requires_grad_(True)
    bd = bias.double().requires_grad_(True)
    xm = x if mask is None else torch.where(mask[:, None, :] != 0, x * mask[:, None, :].double(), 0)
    pre = F.conv1d(F.pad(xm, (w.shape[1] - 1, 0)), wd[:, None, :], bd, groups=w.shape[0])
    out = F.silu(pre) + (x if residual else 0)
    out.backward(dout_bdt.double())
    return out.detach(), x.grad, wd.grad, bd.grad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ptx", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.ptx:
        return ptx_only(args.ptx)

    import triton.testing

    import causal_conv1d_mps as ccmps

    dev, bf16 = "cuda", torch.bfloat16
    copy_gbs = cuda_fwd.copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  copy {copy_gbs:.0f} GB/s")
    opts = ["--use_fast_math"]
    rows = []

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")

    def record(name, ms, n_elems, errs):
        floor_ms = 5 * n_elems * 2 / (copy_gbs * 1e9) * 1e3
        rows.append(dict(name=name, ms=ms, floor_ms=floor_ms, errs=errs))
        print(f"{name:52s} {ms:8.4f} ms  ({100 * floor_ms / ms:5.1f}% of the 5N floor)  "
              f"rel errs out/dx/dw/db {' '.join(f'{e:.1e}' for e in errs)}")

    def rel(got, want):
        return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()

    for (B, D, T) in ((8, 4096, 2048), (2, 2048, 512)):
        for W in (4, 8):
            g = torch.Generator(device=dev).manual_seed(W + T)
            w = (torch.randn(D, W, device=dev, generator=g) * W ** -0.5).to(bf16)
            bias = (torch.randn(D, device=dev, generator=g) * 0.5).to(bf16)
            x = torch.randn(B, D, T, device=dev, generator=g).to(bf16)
            dout = torch.randn(B, D, T, device=dev, generator=g).to(bf16)
            n = x.numel()

            # (B, D, T): causal_conv1d with SiLU, no mask, no residual
            ref = reference(x, w, bias, None, False, dout)
            fwd = torch.cuda._compile_kernel(cuda_fwd.source("bdt", W), "fwd_bdt", nvcc_options=opts)
            bwd = torch.cuda._compile_kernel(source("bdt", W), "bwd_bdt", nvcc_options=opts)
            out, dx = torch.empty_like(x), torch.empty_like(x)
            part = torch.empty(B, D, W + 1, device=dev, dtype=torch.float32)

            def step_bdt():
                fwd(grid=((T // 8 + 127) // 128, D, B), block=(128, 1, 1), args=[x, w, bias, out, T, D])
                bwd(grid=(D, B, 1), block=(128, 1, 1), args=[x, w, bias, dout, dx, part, T, D])
                return part.sum(0)

            total = step_bdt()
            errs = [rel(out, ref[0]), rel(dx, ref[1]), rel(total[:, :W], ref[2]), rel(total[:, W], ref[3])]
            record(f"cuda fwd+bwd (B,D,T) B{B} D{D} T{T} W{W}", bench(step_bdt), n, errs)
            xg = x.detach().clone().requires_grad_(True)
            wg = w.detach().clone().requires_grad_(True)
            bg = bias.detach().clone().requires_grad_(True)

            def step_triton():
                xg.grad = wg.grad = bg.grad = None  # fresh gradients: a graph cannot capture accumulation
                y = ccmps.causal_conv1d_fn(xg, wg, bg, activation="silu")
                y.backward(dout)
                return y

            y = step_triton()
            xg.grad = wg.grad = bg.grad = None
            y = step_triton()
            errs = [rel(y, ref[0]), rel(xg.grad, ref[1]), rel(wg.grad, ref[2]), rel(bg.grad, ref[3])]
            del y  # a live graph keeps the leaves' AccumulateGrad nodes on the default stream: no capture
            record(f"triton fwd+bwd (B,D,T) B{B} D{D} T{T} W{W}", bench(step_triton), n, errs)
            record(f"triton fwd+bwd (B,D,T) in a CUDA graph B{B} D{D} T{T} W{W}", bench(cuda_fwd.graphed(step_triton)), n,
                   errs)

            # [B, T, D]: the fused op with an HF-style mask and the residual
            am = torch.ones(B, T, device=dev, dtype=torch.int64)
            am[0, : T // 8] = 0
            mf = am.to(torch.float32)
            xl = x.transpose(1, 2).contiguous()
            dl = dout.transpose(1, 2).contiguous()
            ref = reference(x, w, bias, mf, True, dout)
            fwd = torch.cuda._compile_kernel(cuda_fwd.source("btd", W, 16, vec_weights=True), "fwd_btd",
                                             nvcc_options=opts)
            bwd = torch.cuda._compile_kernel(source("btd", W), "bwd_btd", nvcc_options=opts)
            out_l, dx_l = torch.empty_like(xl), torch.empty_like(xl)
            L = 128
            part = torch.empty(B * ((T + L - 1) // L), D, W + 1, device=dev, dtype=torch.float32)

            def step_btd():
                fwd(grid=((D // 8 + 63) // 64, (T + 15) // 16, B), block=(64, 1, 1),
                    args=[xl, w, bias, mf, out_l, T, D, 1, 1])
                bwd(grid=((D // 4 + 63) // 64, (T + L - 1) // L, B), block=(64, 1, 1),
                    args=[xl, w, bias, mf, dl, dx_l, part, T, D, 1, 1])
                return part.sum(0)

            total = step_btd()
            errs = [rel(out_l.transpose(1, 2), ref[0]), rel(dx_l.transpose(1, 2), ref[1]),
                    rel(total[:, :W], ref[2]), rel(total[:, W], ref[3])]
            record(f"cuda fused fwd+bwd B{B} T{T} D{D} W{W}", bench(step_btd), n, errs)
            fwd_only = lambda: fwd(grid=((D // 8 + 63) // 64, (T + 15) // 16, B), block=(64, 1, 1),  # noqa: E731
                                   args=[xl, w, bias, mf, out_l, T, D, 1, 1])
            record(f"  of which the fused forward B{B} T{T} D{D} W{W}", bench(fwd_only), n, errs)
            xg = xl.detach().clone().requires_grad_(True)

            def step_fused():
                xg.grad = wg.grad = bg.grad = None
                y = ccmps.short_conv_fused(xg, wg, bg, am, activation=True, residual=True)
                y.backward(dl)
                return y

            y = step_fused()
            xg.grad = wg.grad = bg.grad = None
            y = step_fused()
            errs = [rel(y.transpose(1, 2), ref[0]), rel(xg.grad.transpose(1, 2), ref[1]),
                    rel(wg.grad, ref[2]), rel(bg.grad, ref[3])]
            del y
            record(f"triton fused fwd+bwd B{B} T{T} D{D} W{W}", bench(step_fused), n, errs)
            record(f"triton fused fwd+bwd in a CUDA graph B{B} T{T} D{D} W{W}", bench(cuda_fwd.graphed(step_fused)), n, errs)
    if args.json:
        args.json.write_text(json.dumps(dict(copy_gbs=copy_gbs, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
