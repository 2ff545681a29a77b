"""Prototype for docs/PERFORMANCE.md P4 (decode at B256 D8192 at least 60% of copy under CUDA graphs): the
decode step in CUDA C++ compiled through NVRTC, timed beside the shipped Triton update kernel in one run.

    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_update.py            # on an NVIDIA GPU
    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_update.py --check    # no GPU: through cuda_harness
    NVRTC_LIB=.../libnvrtc.so PYTHONPATH=$PWD python benchmarks/prototypes/cuda_update.py --ptx DIR

The Triton kernel (`triton/kernels/update.py`, the only decode kernel before session 9) tiles 256 channels
per program, reads each state entry with a load per tap, waits at a barrier, and re-reads the state to shift
it: 17.8 us at B256 D8192 W4 (44.7% of copy, docs/PERF_NOTES.md). Here the common case of a decode step, one
token per row with the state shifted in place (no `cache_seqlens`, no `conv_state_indices`), is one pass: a
thread owns 2 channels, loads their 2S state entries as S 32-bit words (consecutive threads read consecutive
words: every access is coalesced), forms the output from registers, and stores the shifted state and the
output. No barrier, no re-read.

Session 9 timed it on an H200 (docs/results/h200-bf16-decode-prototype-session9.log: 8.2 against 16.2 us at
B256 D8192 W4 under CUDA graphs, faster at every size) and the package now ships the same scheme
(`causal_conv1d_mps/cuda/kernels/conv_update.cu`); this script times the Triton kernel, the public API and the
prototype side by side.

Layouts: x `[B, D]` with row stride `sx` (elements, even), state `[B, D, S]` contiguous (S >= W-1: the taps
read its last W-1 entries), out `[B, D]` contiguous, weight `[D, W]` and bias `[D]` bf16 contiguous; D even.
Arithmetic in float32, one rounding per output, states moved bit for bit (the shipped kernel does the same).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_fwd  # noqa: E402

KERNEL_NAME = "update_shift"

KERNEL = r"""
typedef unsigned short bf16_t;
__device__ __forceinline__ float lo(unsigned int w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi(unsigned int w) { return __uint_as_float(w & 0xFFFF0000u); }
__device__ __forceinline__ unsigned int round_bf16(float f) {  // round to nearest even, NaN kept quiet
    const unsigned int u = __float_as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (u >> 16) | 0x40u;
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
__device__ __forceinline__ unsigned int pack(float a, float b) { return round_bf16(a) | (round_bf16(b) << 16); }

// entry e of a thread's 2S state entries (channel 0's S, then channel 1's), from its S words: as float32, and
// as its 16 bits (the state moves bit for bit, NaN payloads included)
__device__ __forceinline__ float entry(const unsigned int (&s)[S], int e) {
    return e & 1 ? hi(s[e >> 1]) : lo(s[e >> 1]);
}
__device__ __forceinline__ unsigned int entry_bits(const unsigned int (&s)[S], int e) {
    return e & 1 ? s[e >> 1] >> 16 : s[e >> 1] & 0xFFFFu;
}

// grid (ceil(D/2 / 128), B), block 128: thread p of row b owns channels 2p, 2p+1
extern "C" __global__ void __launch_bounds__(128) update_shift(
        const unsigned int* __restrict__ x, unsigned int* __restrict__ state, const bf16_t* __restrict__ w,
        const bf16_t* __restrict__ bias, unsigned int* __restrict__ out, int D, int sx) {
    const int p = blockIdx.x * 128 + threadIdx.x, b = blockIdx.y, pairs = D / 2;
    if (p >= pairs) return;
    const unsigned int xw = x[(long long)b * (sx / 2) + p];
    unsigned int* sp = state + ((long long)b * pairs + p) * S;  // 2S entries = S words
    unsigned int s[S];
#pragma unroll
    for (int j = 0; j < S; ++j) s[j] = sp[j];
    float o[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        const int ch = 2 * p + c;
        float acc = HAS_BIAS ? __uint_as_float((unsigned int)bias[ch] << 16) : 0.f;
#pragma unroll
        for (int k = 0; k < W - 1; ++k)
            acc = fmaf(__uint_as_float((unsigned int)w[ch * W + k] << 16), entry(s, c * S + S - (W - 1) + k), acc);
        const float xc = c ? hi(xw) : lo(xw);
        acc = fmaf(__uint_as_float((unsigned int)w[ch * W + W - 1] << 16), xc, acc);
        if (SILU) acc = acc / (1.f + __expf(-acc));
        if (RESIDUAL) acc += xc;
        o[c] = acc;
    }
    out[(long long)b * pairs + p] = pack(o[0], o[1]);
    // the shifted state: entry j of a channel takes entry j + 1, the last one the new token
    unsigned int nb[2 * S];  // the 16 bits of each new entry
#pragma unroll
    for (int c = 0; c < 2; ++c) {
#pragma unroll
        for (int j = 0; j < S - 1; ++j) nb[c * S + j] = entry_bits(s, c * S + j + 1);
        nb[c * S + S - 1] = c ? xw >> 16 : xw & 0xFFFFu;
    }
#pragma unroll
    for (int j = 0; j < S; ++j) sp[j] = nb[2 * j] | (nb[2 * j + 1] << 16);
}
"""

def source(W: int, S: int, has_bias: bool = True, silu: bool = True, residual: bool = True) -> str:
    if not (W >= 2 and S >= W - 1):
        raise ValueError(f"W >= 2 and S >= W - 1 expected, got W = {W}, S = {S}")
    defines = f"#define W {W}\n#define S {S}\n#define HAS_BIAS {int(has_bias)}\n#define SILU {int(silu)}\n" \
              f"#define RESIDUAL {int(residual)}\n"
    return defines + KERNEL


def launch(kernel, x, state, w, bias, out) -> None:
    """x `[B, D]` (row stride even, unit channel stride), state `[B, D, S]` contiguous, out `[B, D]` contiguous."""
    B, D = x.shape
    kernel(grid=(-(-(D // 2) // 128), B, 1), block=(128, 1, 1),
           args=[x, state, w, bias if bias is not None else w, out, D, x.stride(0)])


def reference(x, state, w, bias, silu: bool, residual: bool):
    """float64 (out `[B, D]`, new state `[B, D, S]`) of one decode step (the contract's, shift mode)."""
    W, S = w.shape[1], state.shape[2]
    window = torch.cat([state.double()[:, :, S - (W - 1):], x.double()[:, :, None]], dim=2)  # [B, D, W]
    pre = (window * w.double()[None]).sum(-1) + (0 if bias is None else bias.double()[None])
    out = pre * torch.sigmoid(pre) if silu else pre
    if residual:
        out = out + x.double()
    return out, torch.cat([state[:, :, 1:], x[:, :, None]], dim=2)


def _inputs(B, D, W, S, device, seed, row_stride=None):
    g = torch.Generator(device=device).manual_seed(seed)
    wide = torch.randn(B, row_stride or D, device=device, generator=g).to(torch.bfloat16)
    x = wide[:, :D]
    state = torch.randn(B, D, S, device=device, generator=g).to(torch.bfloat16)
    w = (torch.randn(D, W, device=device, generator=g) * W ** -0.5).to(torch.bfloat16)
    bias = (torch.randn(D, device=device, generator=g) * 0.5).to(torch.bfloat16)
    return x, state, w, bias


CHECK_CASES = (  # (B, D, W, S, x row stride): D not a multiple of a block's 256 channels; S = W - 1 and S > W - 1
    (3, 6, 4, 3, None), (1, 258, 4, 4, 300), (2, 130, 2, 1, None), (2, 34, 7, 6, 40), (1, 8, 3, 5, None))


def check(cases=CHECK_CASES, verbose=True) -> int:
    """Every case on the CPU through cuda_harness against float64 (outputs within 1 bf16 ulp plus the float32
    sum's rounding, states bit for bit), with and without bias, SiLU and residual; 0 when all pass."""
    import cuda_harness

    reason = cuda_harness.unavailable_reason()
    if reason:
        print(f"cuda_harness unavailable: {reason}")
        return 1
    failures = runs = 0
    for B, D, W, S, stride in cases:
        for has_bias, silu, residual in ((True, True, True), (False, False, False), (True, False, True)):
            kernel = cuda_harness.compile_kernel(source(W, S, has_bias, silu, residual), KERNEL_NAME)
            x, state, w, bias = _inputs(B, D, W, S, "cpu", B + D + W + S, stride)
            b = bias if has_bias else None
            want_out, want_state = reference(x, state, w, b, silu, residual)
            out = torch.full((B, D), float("nan"), dtype=torch.bfloat16)
            launch(kernel, x, state, w, b, out)
            err = (out.double() - want_out).abs()
            bound = 2.0 ** -7 * want_out.abs() + 1e-3  # one bf16 rounding of a float32 result
            ok = bool((err <= bound).all()) and torch.equal(state, want_state)
            failures += not ok
            runs += 1
            if verbose or not ok:
                print(f"B{B} D{D} W{W} S{S} stride {stride or D} bias={int(has_bias)} silu={int(silu)} "
                      f"residual={int(residual)}: worst {err.max().item():.2e}, state "
                      f"{'bit for bit' if torch.equal(state, want_state) else 'DIFFERS'} {'ok' if ok else 'FAIL'}")
    print(f"{runs - failures} of {runs} runs pass")
    return int(failures > 0)


def ptx_only(out_dir: Path) -> int:
    return cuda_fwd.write_ptx(out_dir, ((f"update W{W} S{S}", f"update_W{W}_S{S}", source(W, S))
                                        for W, S in ((4, 3), (4, 4), (2, 1), (7, 6))))


def _us_per_call(fn, calls_per_fn: int, repeats: int, samples: int = 1) -> float:
    """The median over `samples` of the us per call of `repeats` back-to-back `fn()`, each making
    `calls_per_fn` calls (CUDA events around each sample)."""
    found = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        found.append(start.elapsed_time(end) * 1e3 / (repeats * calls_per_fn))
    return statistics.median(found)


def _graph_us(step, calls: int = 20) -> float:
    """us per call of `calls` back-to-back calls captured in one CUDA graph (the replay's own cost spread)."""
    return _us_per_call(cuda_fwd.graphed(lambda: [step() for _ in range(calls)]), calls, repeats=10, samples=15)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="correctness on the CPU through cuda_harness, no GPU")
    p.add_argument("--ptx", type=Path, help="compile to PTX into this folder and stop (no GPU)")
    p.add_argument("--width", type=int, default=4)
    args = p.parse_args(argv)
    if args.check:
        return check()
    if args.ptx:
        return ptx_only(args.ptx)
    if not torch.cuda.is_available():
        print("cuda_update: needs an NVIDIA GPU (or --check / --ptx)", file=sys.stderr)
        return 2
    import causal_conv1d_mps as ccmps
    from causal_conv1d_mps._activation import SILU
    from causal_conv1d_mps.bench import traffic
    from causal_conv1d_mps.triton import launch_update

    W = args.width
    copy = cuda_fwd.copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  copy {copy:.0f} GB/s  W {W}  "
          f"(us per call: 20 calls per CUDA graph, and eager calls)")
    # S = W - 1: bench.py's decode rows; S = W: what transformers' caches keep
    for S, (B, D) in ((S, shape) for S in (W - 1, W)
                      for shape in ((1, 4096), (8, 4096), (32, 4096), (64, 8192), (256, 8192))):
        kernel = torch.cuda._compile_kernel(source(W, S), KERNEL_NAME, nvcc_options=["--use_fast_math", "-std=c++17"])
        x, state, w, bias = _inputs(B, D, W, S, "cuda", B + D)
        nbytes = traffic.decode_bytes(B, D, S + 1, 2)  # x, out, and the state read and written
        triton_state, api_state, proto_state = state.clone(), state.clone(), state.clone()
        out = torch.empty_like(x)
        want = launch_update.launch_update(x[:, None], triton_state, w, bias, None, None, SILU, True)[:, 0]
        launch(kernel, x, proto_state, w, bias, out)
        same_state = torch.equal(proto_state, triton_state)
        rel = ((out.float() - want.float()).norm() / want.float().norm()).item()
        rows = {  # the Triton kernel alone; the public API (since session 9 the shipped CUDA C++ kernel)
            "Triton kernel": lambda: launch_update.launch_update(x[:, None], triton_state, w, bias, None, None,
                                                                 SILU, True),
            "api (shipped)": lambda: ccmps.short_conv_update(x, api_state, w, bias, activation=True, residual=True),
            "prototype": lambda: launch(kernel, x, proto_state, w, bias, out),
        }
        for name, step in rows.items():
            us = _graph_us(step)
            for _ in range(20):
                step()
            torch.cuda.synchronize()
            eager_us = _us_per_call(step, 1, repeats=200)
            print(f"S{S} B{B:<4d} D{D}  {name:17s} graph {us:7.2f} us ({100 * nbytes / (us * 1e-6) / 1e9 / copy:5.1f}% "
                  f"of copy)  eager {eager_us:7.2f} us   prototype vs Triton: out rel {rel:.1e}, state "
                  f"{'same' if same_state else 'DIFFERS'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
