"""Prototype for issue #12, item 4 ("choose the tool by measurement"): the forward as CUDA C++ compiled at
first use through NVRTC (`torch.cuda._compile_kernel`, which PyTorch's CUDA wheels carry), timed beside
the shipped Triton kernels in one run, as % of a device copy.

    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_fwd.py            # on an NVIDIA GPU
    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_fwd.py --ptx DIR  # no GPU: compile to PTX only

Three bf16 kernels, each with a register sliding window over time (what Triton cannot express):
- `fwd_bdt`: `x` `[B, D, T]` with T contiguous. A thread owns 8 consecutive steps (one 16-byte load);
  the W-1 steps before them come from the lane below through warp shuffles (lane 0 loads them).
- `fwd_btd`: `x` `[B, T, D]` with D contiguous (channel-last, the fused op's layout). A thread owns 8
  channels (one 16-byte load per step) and walks R steps, the window shifting through registers; the
  W-1 steps before the run are loaded again (L2 hits, (W-1)/R more requests).
- the same `fwd_btd` with the fused op's float32 mask `[B, T]` (selection, not a product, so that a
  masked-out NaN contributes nothing) and the residual.
Bias and SiLU in all. Nothing here is shipped: it is the measurement that decides whether the CUDA C++
route is worth building (with a CPU harness for CI, as the Metal kernels have).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

COMMON = r"""
typedef unsigned short bf16_t;
__device__ __forceinline__ float b2f(unsigned int h) { return __uint_as_float(h << 16); }
__device__ __forceinline__ unsigned int f2b(float f) {
    unsigned int u = __float_as_uint(f);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even (no NaN handling: prototype)
}
__device__ __forceinline__ void unpack(uint4 v, float* f) {
    unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) { f[2 * i] = b2f(w[i] & 0xFFFFu); f[2 * i + 1] = b2f(w[i] >> 16); }
}
__device__ __forceinline__ uint4 pack(const float* f) {
    return make_uint4(f2b(f[0]) | (f2b(f[1]) << 16), f2b(f[2]) | (f2b(f[3]) << 16),
                      f2b(f[4]) | (f2b(f[5]) << 16), f2b(f[6]) | (f2b(f[7]) << 16));
}
__device__ __forceinline__ float silu(float v) { return v / (1.f + __expf(-v)); }
"""

BDT = r"""
// grid (ceil(T/8 / 128), D, B), block 128; T % 8 == 0
extern "C" __global__ void __launch_bounds__(128) fwd_bdt(const uint4* __restrict__ x,
        const bf16_t* __restrict__ w, const bf16_t* __restrict__ bias, uint4* __restrict__ out, int T, int D) {
    const int d = blockIdx.y, b = blockIdx.z, nv = T / 8;
    const long row = ((long)b * D + d) * nv;
    const int v = blockIdx.x * 128 + threadIdx.x;
    const int lane = threadIdx.x & 31;
    float wk[W];
#pragma unroll
    for (int k = 0; k < W; ++k) wk[k] = b2f(w[d * W + k]);
    const float bs = b2f(bias[d]);
    uint4 cur = v < nv ? x[row + v] : make_uint4(0, 0, 0, 0);
    uint4 prev;
    prev.x = __shfl_up_sync(0xFFFFFFFFu, cur.x, 1);
    prev.y = __shfl_up_sync(0xFFFFFFFFu, cur.y, 1);
    prev.z = __shfl_up_sync(0xFFFFFFFFu, cur.z, 1);
    prev.w = __shfl_up_sync(0xFFFFFFFFu, cur.w, 1);
    if (lane == 0) prev = (v > 0 && v <= nv) ? x[row + v - 1] : make_uint4(0, 0, 0, 0);
    if (v >= nv) return;
    float xs[16];
    unpack(prev, xs);
    unpack(cur, xs + 8);
    float o[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        float acc = bs;
#pragma unroll
        for (int k = 0; k < W; ++k) acc = fmaf(wk[k], xs[8 + i - (W - 1) + k], acc);
        o[i] = silu(acc);
    }
    out[row + v] = pack(o);
}
"""

BTD = r"""
// grid (ceil(D/8 / 64), ceil(T / R), B), block 64; D % 8 == 0
extern "C" __global__ void __launch_bounds__(64) fwd_btd(const uint4* __restrict__ x,
        const bf16_t* __restrict__ w, const bf16_t* __restrict__ bias, const float* __restrict__ mask,
        uint4* __restrict__ out, int T, int D, int has_mask, int residual) {
    const int c = blockIdx.x * 64 + threadIdx.x, b = blockIdx.z, t0 = blockIdx.y * R, nc = D / 8;
    if (c >= nc) return;
    const uint4* xb = x + (long)b * T * nc + c;
    uint4* ob = out + (long)b * T * nc + c;
    const float* mb = mask + (long)b * T;
    float wk[W][8], bs[8];
#if VEC_WEIGHTS
    // the 8 channels' weights are 8*W contiguous values: W 16-byte loads instead of 8*W scalar ones
    {
        const uint4* wv = reinterpret_cast<const uint4*>(w + c * 8 * W);
        float flat[8 * W];
#pragma unroll
        for (int i = 0; i < W; ++i) unpack(wv[i], flat + 8 * i);
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int k = 0; k < W; ++k) wk[k][j] = flat[j * W + k];
        float fb[8];
        unpack(reinterpret_cast<const uint4*>(bias)[c], fb);
#pragma unroll
        for (int j = 0; j < 8; ++j) bs[j] = fb[j];
    }
#else
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int k = 0; k < W; ++k) wk[k][j] = b2f(w[(c * 8 + j) * W + k]);
        bs[j] = b2f(bias[c * 8 + j]);
    }
#endif
    float win[W][8];  // win[W-1] is the current step
#pragma unroll
    for (int k = 0; k < W - 1; ++k) {
        const int t = t0 - (W - 1) + k;
        float f[8];
        if (t >= 0) {
            unpack(xb[(long)t * nc], f);
            const float m = has_mask ? mb[t] : 1.f;
#pragma unroll
            for (int j = 0; j < 8; ++j) win[k][j] = m != 0.f ? f[j] * m : 0.f;
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) win[k][j] = 0.f;
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int t = t0 + r;
        if (t >= T) break;
        float f[8], o[8];
        unpack(xb[(long)t * nc], f);
        const float m = has_mask ? mb[t] : 1.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) win[W - 1][j] = m != 0.f ? f[j] * m : 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            float acc = bs[j];
#pragma unroll
            for (int k = 0; k < W; ++k) acc = fmaf(wk[k][j], win[k][j], acc);
            o[j] = silu(acc) + (residual ? f[j] : 0.f);
        }
        ob[(long)t * nc] = pack(o);
#pragma unroll
        for (int k = 0; k < W - 1; ++k)
#pragma unroll
            for (int j = 0; j < 8; ++j) win[k][j] = win[k + 1][j];
    }
}
"""


def source(kind: str, W: int, R: int = 16, vec_weights: bool = False) -> str:
    return (f"#define W {W}\n#define R {R}\n#define VEC_WEIGHTS {int(vec_weights)}\n" + COMMON
            + (BDT if kind == "bdt" else BTD))


def nvrtc_ptx(text: str) -> bytes:
    """PTX of `text` for sm_90 from the NVRTC library named by $NVRTC_LIB (no GPU needed); raises with the
    compiler's log when it fails."""
    lib = ctypes.CDLL(os.environ.get("NVRTC_LIB", "libnvrtc.so"))
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), b"p.cu", 0, None, None) == 0
    opts = [b"--gpu-architecture=compute_90", b"-default-device", b"--use_fast_math"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        raise RuntimeError(log.value.decode())
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB bf16 device copy (read + write), the yardstick of every % of copy."""
    import triton.testing

    a = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() * 2 / (ms * 1e-3) / 1e9


def graphed(step):
    """`step` captured in a CUDA graph: its replay is the GPU time alone, without the host's share."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def write_ptx(out_dir: Path, jobs) -> int:
    """Each job `(label, file stem, source text)` through NVRTC to `out_dir/<stem>.ptx` for sm_90 (no GPU:
    $NVRTC_LIB names the library); prints one line per job, and returns 1 if any compile failed (the others
    are still written), else 0. The prototypes' `--ptx` options all come here."""
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for label, stem, text in jobs:
        try:
            ptx = nvrtc_ptx(text)
        except RuntimeError as exc:
            print(f"{label}: compile failed\n{exc}")
            failed += 1
            continue
        (out_dir / f"{stem}.ptx").write_bytes(ptx)
        print(f"{label}: {len(ptx)} bytes of PTX")
    return int(failed > 0)


def ptx_only(out_dir: Path) -> int:
    """Compile every variant to PTX (no GPU needed)."""
    variants = (("bdt", 4, 16), ("btd", 4, 16), ("btd", 4, 32), ("bdt", 8, 16), ("btd", 8, 16))
    return write_ptx(out_dir, ((f"{kind} W{W} R{R}", f"{kind}_W{W}_R{R}", source(kind, W, R, kind == "btd"))
                               for kind, W, R in variants))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ptx", type=Path, help="compile to PTX into this folder and stop (no GPU)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.ptx:
        return ptx_only(args.ptx)

    import triton.testing

    import causal_conv1d_mps as ccmps

    dev, bf16 = "cuda", torch.bfloat16
    copy_gbs = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  copy {copy_gbs:.0f} GB/s")
    kernels = {}

    def kernel(kind, W, R=16, vec=False):
        key = (kind, W, R, vec)
        if key not in kernels:
            name = "fwd_bdt" if kind == "bdt" else "fwd_btd"
            kernels[key] = torch.cuda._compile_kernel(source(kind, W, R, vec), name, nvcc_options=["--use_fast_math"])
        return kernels[key]

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")

    rows = []

    def record(name, ms, nbytes, err):
        pct = nbytes / (ms * 1e-3) / 1e9 / copy_gbs * 100
        rows.append(dict(name=name, ms=ms, pct_copy=pct, rel_err=err))
        print(f"{name:58s} {ms:8.4f} ms {pct:6.1f}% of copy   rel err {err:.1e}")

    def rel(got, want):
        return ((got.double() - want).norm() / want.norm()).item()

    for (B, D, T) in ((4, 4096, 8192), (8, 2048, 4096), (8, 4096, 2048)):
        for W in (4, 7, 8):
            g = torch.Generator(device=dev).manual_seed(W)
            w = (torch.randn(D, W, device=dev, generator=g) * W ** -0.5).to(bf16)
            bias = (torch.randn(D, device=dev, generator=g) * 0.5).to(bf16)
            x = torch.randn(B, D, T, device=dev, generator=g).to(bf16)
            ref = F.conv1d(F.pad(x.double(), (W - 1, 0)), w.double()[:, None, :], bias.double(), groups=D)
            ref = ref * torch.sigmoid(ref)
            nbytes = 2 * x.numel() * 2
            out = torch.empty_like(x)
            k = kernel("bdt", W)
            grid = ((T // 8 + 127) // 128, D, B)
            run = lambda: k(grid=grid, block=(128, 1, 1), args=[x, w, bias, out, T, D])  # noqa: E731
            run()
            record(f"cuda (B,D,T) B{B} D{D} T{T} W{W}", bench(run), nbytes, rel(out, ref))
            tri = lambda: ccmps.causal_conv1d_fn(x, w, bias, activation="silu")  # noqa: E731
            record(f"triton (B,D,T) B{B} D{D} T{T} W{W}", bench(tri), nbytes, rel(tri(), ref))

            xl = x.transpose(1, 2).contiguous()  # [B, T, D]
            for R, vec in ((16, False), (16, True), (32, True)):
                out_l = torch.empty_like(xl)
                k = kernel("btd", W, R, vec)
                grid = ((D // 8 + 63) // 64, (T + R - 1) // R, B)
                run = lambda: k(grid=grid, block=(64, 1, 1), args=[xl, w, bias, xl, out_l, T, D, 0, 0])  # noqa: E731
                run()
                record(f"cuda channel-last R{R}{' vec-w' if vec else ''} B{B} D{D} T{T} W{W}", bench(run), nbytes,
                       rel(out_l.transpose(1, 2), ref))
            xt = xl.transpose(1, 2)
            tri = lambda: ccmps.causal_conv1d_fn(xt, w, bias, activation="silu")  # noqa: E731
            record(f"triton channel-last B{B} D{D} T{T} W{W}", bench(tri), nbytes, rel(tri(), ref))

            # the fused op: HF-style left padding mask, bias, SiLU, residual
            am = torch.ones(B, T, device=dev, dtype=torch.int64)
            am[0, : T // 8] = 0
            mf = am.to(torch.float32)
            xm = torch.where(mf[:, None, :] != 0, x.double() * mf[:, None, :], 0)
            fref = F.conv1d(F.pad(xm, (W - 1, 0)), w.double()[:, None, :], bias.double(), groups=D)
            fref = (fref * torch.sigmoid(fref) + x.double()).transpose(1, 2)
            for vec in (False, True):
                out_l = torch.empty_like(xl)
                k = kernel("btd", W, 16, vec)
                grid = ((D // 8 + 63) // 64, (T + 15) // 16, B)
                run = lambda: k(grid=grid, block=(64, 1, 1), args=[xl, w, bias, mf, out_l, T, D, 1, 1])  # noqa: E731
                run()
                record(f"cuda fused mask+residual R16{' vec-w' if vec else ''} B{B} T{T} D{D} W{W}", bench(run),
                       nbytes, rel(out_l, fref))
            tri = lambda: ccmps.short_conv_fused(xl, w, bias, am, activation=True, residual=True)  # noqa: E731
            record(f"triton fused mask+residual B{B} T{T} D{D} W{W}", bench(tri), nbytes, rel(tri(), fref))
    if args.json:
        args.json.write_text(json.dumps(dict(copy_gbs=copy_gbs, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
