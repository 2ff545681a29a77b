"""Prototype for issue #12 (P2, P6): the channel-last forward and the fused op's forward `[B, T, D]` as CUDA C++,
with every load of a thread's run issued before any arithmetic, timed beside the shipped kernels in one run.

    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_btd.py            # on an NVIDIA GPU: the sweep
    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_btd.py --check    # no GPU: small shapes through
                                                                        # cuda_harness against float64

Why: `cuda_fwd.py`'s channel-last kernel reached only 50-60% of copy at W = 4 (H200, session 5), against
Triton's 85%. Its loop loaded one row per step behind a `break`, so each thread had one 16-byte load in
flight at a time: latency-bound. Here a thread owns VEC channels (VEC * 2 bytes per row: 16 or 8) and R
consecutive steps; it loads its R + W - 1 rows (and their mask values) with predicated loads, no branch,
then converts each row once (masked by selection: a masked-out NaN contributes nothing) and forms the W taps
from registers. Bias, SiLU, and for the fused op the residual (the unmasked x). bf16 only; weights and
bias bf16 `[D, W]` / `[D]`; D a multiple of VEC. Nothing here is shipped.
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

KERNEL = r"""
#if VEC == 8
typedef uint4 vec_t;
__device__ __forceinline__ void unpack_v(vec_t v, float* f) { unpack(v, f); }
__device__ __forceinline__ vec_t pack_v(const float* f) { return pack(f); }
__device__ __forceinline__ vec_t zero_v() { return make_uint4(0, 0, 0, 0); }
#else
typedef uint2 vec_t;
__device__ __forceinline__ void unpack_v(vec_t v, float* f) {
    f[0] = b2f(v.x & 0xFFFFu); f[1] = b2f(v.x >> 16); f[2] = b2f(v.y & 0xFFFFu); f[3] = b2f(v.y >> 16);
}
__device__ __forceinline__ vec_t pack_v(const float* f) {
    return make_uint2(f2b(f[0]) | (f2b(f[1]) << 16), f2b(f[2]) | (f2b(f[3]) << 16));
}
__device__ __forceinline__ vec_t zero_v() { return make_uint2(0, 0); }
#endif

// grid (ceil(D / VEC / TPB), ceil(T / R), B), block TPB; x and out [B, T, D] contiguous, mask [B, T] float32
extern "C" __global__ void __launch_bounds__(TPB) fwd_btd2(const bf16_t* __restrict__ x,
        const bf16_t* __restrict__ w, const bf16_t* __restrict__ bias, const float* __restrict__ mask,
        bf16_t* __restrict__ out, int T, int D) {
    constexpr int H = W - 1, N = R + H;
    const int c = blockIdx.x * TPB + threadIdx.x, b = blockIdx.z, t0 = blockIdx.y * R;
    if (c * VEC >= D) return;
    const bf16_t* xb = x + (long)b * T * D + c * VEC;
    vec_t raw[N];
    float m[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {  // every load first: predicated, no branch between them
        const int t = t0 - H + i;
        const bool ok = t >= 0 && t < T;
        raw[i] = ok ? *reinterpret_cast<const vec_t*>(xb + (long)t * D) : zero_v();
#if HAS_MASK
        m[i] = ok ? mask[(long)b * T + t] : 0.f;
#else
        m[i] = 1.f;
#endif
    }
    float wk[W][VEC], bs[VEC];
    {
        float flat[VEC * W];  // the VEC channels' weights are VEC * W contiguous values
        const vec_t* wv = reinterpret_cast<const vec_t*>(w + (long)c * VEC * W);
#pragma unroll
        for (int i = 0; i < W; ++i) unpack_v(wv[i], flat + VEC * i);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
#pragma unroll
            for (int k = 0; k < W; ++k) wk[k][j] = flat[j * W + k];
        unpack_v(reinterpret_cast<const vec_t*>(bias)[c], bs);
    }
    float xf[N][VEC];
#pragma unroll
    for (int i = 0; i < N; ++i) {
        float f[VEC];
        unpack_v(raw[i], f);
#pragma unroll
        for (int j = 0; j < VEC; ++j) xf[i][j] = HAS_MASK ? (m[i] != 0.f ? f[j] * m[i] : 0.f) : f[j];
    }
    bf16_t* ob = out + (long)b * T * D + c * VEC;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        float o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            float acc = bs[j];
#pragma unroll
            for (int k = 0; k < W; ++k) acc = fmaf(wk[k][j], xf[r + k][j], acc);
            o[j] = silu(acc);
        }
#if RESIDUAL
        float res[VEC];
        unpack_v(raw[r + H], res);
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] += res[j];
#endif
        if (t0 + r < T) *reinterpret_cast<vec_t*>(ob + (long)(t0 + r) * D) = pack_v(o);
    }
}
"""


def source(W: int, R: int, vec: int, tpb: int, has_mask: bool, residual: bool) -> str:
    defines = dict(W=W, R=R, VEC=vec, TPB=tpb, HAS_MASK=int(has_mask), RESIDUAL=int(residual))
    return "".join(f"#define {k} {v}\n" for k, v in defines.items()) + cuda_fwd.COMMON + KERNEL


def launch(kernel, x, w, bias, mask, out, R: int, vec: int, tpb: int):
    B, T, D = x.shape
    groups = D // vec
    kernel(grid=(-(-groups // tpb), -(-T // R), B), block=(tpb, 1, 1),
           args=[x, w, bias, mask if mask is not None else x, out, T, D])


def reference(x, w, bias, mask, residual):
    """float64 `[B, T, D]`: (x if residual) + silu(bias + conv(x * mask by selection))."""
    xd = x.double()
    xm = xd if mask is None else torch.where(mask[:, :, None] != 0, xd * mask.double()[:, :, None], 0)
    W = w.shape[1]
    pre = F.conv1d(F.pad(xm.transpose(1, 2), (W - 1, 0)), w.double()[:, None, :], bias.double(),
                   groups=x.shape[2]).transpose(1, 2)
    y = pre * torch.sigmoid(pre)
    return y + xd if residual else y


def _inputs(B, T, D, W, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, T, D, device=device, generator=g).to(torch.bfloat16)
    w = (torch.randn(D, W, device=device, generator=g) * W ** -0.5).to(torch.bfloat16)
    bias = (torch.randn(D, device=device, generator=g) * 0.5).to(torch.bfloat16)
    mask = torch.ones(B, T, device=device)
    mask[0, : T // 4] = 0  # left padding in row 0
    x[0, 0, 0] = float("nan")  # masked out: must not reach any output but its own residual
    return x, w, bias, mask


def check() -> int:
    """Small awkward shapes on the CPU through cuda_harness (T not a multiple of R, T < W)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import cuda_harness

    reason = cuda_harness.unavailable_reason()
    if reason:
        print(f"cuda_harness unavailable: {reason}")
        return 1
    failures = 0
    for W, R, vec, tpb in ((4, 8, 8, 32), (7, 8, 4, 32), (8, 16, 8, 32), (16, 8, 4, 32), (1, 4, 8, 32)):
        for has_mask in (False, True):
            for (B, T, D) in ((2, 13, 64), (1, 3, 40), (2, 37, 8)):
                if D % vec:
                    continue
                x, w, bias, mask = _inputs(B, T, D, W, "cpu", W + T)
                if not has_mask:
                    x[0, 0, 0] = 0.5
                m = mask if has_mask else None
                kernel = cuda_harness.compile_kernel(source(W, R, vec, tpb, has_mask, has_mask), "fwd_btd2")
                out = torch.empty_like(x)
                launch(kernel, x, w, bias, m, out, R, vec, tpb)
                want = reference(x, w, bias, m, has_mask)
                finite = torch.isfinite(want)
                same_nan = torch.equal(torch.isnan(out.double()), torch.isnan(want))
                err = ((out.double() - want)[finite].norm() / want[finite].norm()).item()
                ok = err < 1e-2 and same_nan
                failures += not ok
                print(f"W{W} R{R} VEC{vec} mask={int(has_mask)} B{B} T{T} D{D}: rel err {err:.1e}"
                      f"{'' if same_nan else ' NaN pattern differs'} {'ok' if ok else 'FAIL'}")
    return int(failures > 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="correctness on the CPU through cuda_harness, no GPU")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.check:
        return check()

    import triton.testing

    import causal_conv1d_mps as ccmps

    copy_gbs = cuda_fwd.copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  copy {copy_gbs:.0f} GB/s")
    rows = []

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=120, return_mode="median")

    def record(name, ms, nbytes, err):
        pct = nbytes / (ms * 1e-3) / 1e9 / copy_gbs * 100
        rows.append(dict(name=name, ms=ms, pct_copy=pct, rel_err=err))
        print(f"{name:60s} {ms:8.4f} ms {pct:6.1f}% of copy   rel err {err:.1e}", flush=True)

    def rel(got, want):
        finite = torch.isfinite(want)
        return ((got.double() - want)[finite].norm() / want[finite].norm()).item()

    variants = ((8, 8, 64), (8, 16, 64), (4, 8, 64), (4, 16, 128))  # (VEC, R, TPB)
    for (B, T, D) in ((4, 8192, 4096), (8, 2048, 4096)):
        for W in (2, 4, 7, 8, 16):
            x, w, bias, mask = _inputs(B, T, D, W, "cuda", W)
            nbytes = 2 * x.numel() * 2
            am = mask.to(torch.int64)
            for has_mask in (False, True):
                m = mask if has_mask else None
                want = reference(x, w, bias, m, has_mask)
                label = "fused mask+residual" if has_mask else "channel-last"
                for vec, R, tpb in variants:
                    kernel = torch.cuda._compile_kernel(source(W, R, vec, tpb, has_mask, has_mask), "fwd_btd2",
                                                        nvcc_options=["--use_fast_math"])
                    out = torch.empty_like(x)
                    run = lambda: launch(kernel, x, w, bias, m, out, R, vec, tpb)  # noqa: E731
                    run()
                    record(f"cuda {label} VEC{vec} R{R} B{B} T{T} D{D} W{W}", bench(run), nbytes, rel(out, want))
                if has_mask:
                    shipped = lambda: ccmps.short_conv_fused(x, w, bias, am, activation=True)  # noqa: E731
                else:
                    xt = x.transpose(1, 2)
                    shipped = lambda: ccmps.causal_conv1d(xt, w, bias, "silu").transpose(1, 2)  # noqa: E731
                with torch.no_grad():
                    record(f"shipped {label} B{B} T{T} D{D} W{W}", bench(shipped), nbytes, rel(shipped(), want))
    if args.json:
        args.json.write_text(json.dumps(dict(copy_gbs=copy_gbs, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
