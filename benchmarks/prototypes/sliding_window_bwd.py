"""Prototype, not used by the package: the backward of the channel-last fused op (bias, SiLU, residual)
with everything in registers: no float32 scratch, no barriers, no per-tile reductions. Companion of
`sliding_window_fwd.py` (same slot scheme; docs/PERF_NOTES.md, "Lead for v5").

A program owns BD channels and CHUNK time steps and walks t = t0 .. t0 + CHUNK + W - 2 once:
- `x_hist` holds the last BW input rows. From it come pre[t], then g[t] = dout[t] * silu'(pre[t]).
- `g_hist` holds the last BW values of g. dx[t - (W-1)] = dout[t - (W-1)] + sum_k w[k] g[t - k] is
  complete at step t.
- dweight[k] += g[t] * x[t - (W-1) + k] and dbias += g[t] go into `[BW, BD]` register accumulators. A
  `where` on a compile-time slot folds, leaving one FFMA. Each thread owns its channels over all steps,
  so nothing is summed across threads. Each program writes one partial row, reduced in a fixed order
  afterwards, as in the package.

    PYTHONPATH=$PWD python benchmarks/prototypes/sliding_window_bwd.py          # check under the interpreter
    PYTHONPATH=$PWD python benchmarks/prototypes/sliding_window_bwd.py --asm    # SASS counts (no GPU needed)
"""
from __future__ import annotations

import os
import sys

if "--asm" not in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels below

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from causal_conv1d_mps.triton.kernels.common import sigmoid  # noqa: E402
from sliding_window_fwd import pick, window_start  # noqa: E402


@triton.jit
def sliding_window_bwd(x, weight, bias, dout, dx, dw_partial, T, D, stride_b, stride_t,
                       W: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr,
                       VEC: tl.constexpr = 8):
    """Assumes D % BD == 0, CHUNK % BW == 0 and W <= BW (a prototype); T is arbitrary."""
    i_c, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # VEC channels per access (and per thread): 8 fills 16 bytes of bf16; 4 halves the registers (W >= 8)
    o_d = tl.max_contiguous(i_d * BD + tl.arange(0, BD), VEC)
    o_w = tl.arange(0, BW)
    p_x = x + i_b.to(tl.int64) * stride_b + o_d
    p_do = dout + i_b.to(tl.int64) * stride_b + o_d
    p_dx = dx + i_b.to(tl.int64) * stride_b + o_d
    t0 = i_c * CHUNK
    w_tile, b_bias, x_hist = window_start(p_x, weight, bias, o_d, o_w, t0, stride_t, W, BW)
    g_hist = x_hist * 0.  # same layout as x_hist
    dw_acc = x_hist * 0.  # rows 0..W-1: dweight taps
    db_acc = b_bias * 0.
    for outer in range(0, CHUNK + BW, BW):
        for j in tl.static_range(BW):
            t = t0 + outer + j
            live = (o_d * 0 + t) < T
            row = tl.load(p_x + t * stride_t, mask=live, other=0.).to(tl.float32)
            x_hist = tl.where(o_w[:, None] == j, row[None, :], x_hist)
            pre = b_bias
            for k in tl.static_range(W):
                pre = tl.fma(pick(x_hist, o_w, (j - (W - 1) + k + BW) % BW), pick(w_tile, o_w, k), pre)
            sig = sigmoid(pre)
            g = tl.load(p_do + t * stride_t, mask=live, other=0.).to(tl.float32) * (sig * (1.0 + pre * (1.0 - sig)))
            g_hist = tl.where(o_w[:, None] == j, g[None, :], g_hist)
            # this program's share of dweight/dbias: the steps of its own chunk
            g_own = tl.where((o_d * 0 + t) < t0 + CHUNK, g, 0.)
            db_acc += g_own
            for k in tl.static_range(W):
                x_k = pick(x_hist, o_w, (j - (W - 1) + k + BW) % BW)
                dw_acc = tl.where(o_w[:, None] == k, dw_acc + (g_own * x_k)[None, :], dw_acc)
            # dx of the step W-1 back: all the g it needs are in g_hist now
            s = t - (W - 1)
            ok = ((o_d * 0 + s) >= t0) & ((o_d * 0 + s) < t0 + CHUNK) & ((o_d * 0 + s) < T)
            b_dx = tl.load(p_do + s * stride_t, mask=ok, other=0.).to(tl.float32)  # the residual's share
            for k in tl.static_range(W):
                b_dx = tl.fma(pick(g_hist, o_w, (j - k + BW) % BW), pick(w_tile, o_w, k), b_dx)
            tl.store(p_dx + s * stride_t, b_dx.to(dx.dtype.element_ty), mask=ok)
    i_p = i_b * tl.num_programs(0) + i_c
    p_part = dw_partial + (i_p.to(tl.int64) * D + o_d[None, :]) * (W + 1) + o_w[:, None]
    tl.store(p_part, dw_acc, mask=(o_w < W)[:, None])
    tl.store(dw_partial + (i_p.to(tl.int64) * D + o_d) * (W + 1) + W, db_acc)


def run(x, weight, bias, dout, BD: int, CHUNK: int, num_warps: int = 1):
    B, T, D = x.shape
    W = weight.shape[1]
    n_chunks = -(-T // CHUNK)
    dx = torch.empty_like(x)
    partial = torch.empty(B * n_chunks, D, W + 1, dtype=torch.float32, device=x.device)
    sliding_window_bwd[(n_chunks, D // BD, B)](x, weight, bias, dout, dx, partial, T, D, x.stride(0), x.stride(1),
                                               W=W, BW=triton.next_power_of_2(W), BD=BD, CHUNK=CHUNK,
                                               num_warps=num_warps)
    sums = partial.sum(0)  # the package reduces these rows in a fixed order in a kernel
    return dx, sums[:, :W], sums[:, W]


def check():
    from causal_conv1d_mps import reference

    torch.manual_seed(0)
    for W, T in ((1, 20), (4, 45), (5, 37)):  # T: several chunks, the last one partial
        x = torch.randn(2, T, 16)
        w, b, do = torch.randn(16, W) * 0.5, torch.randn(16), torch.randn(2, T, 16)
        got = run(x, w, b, do, BD=16, CHUNK=16)
        want = reference.short_conv_fused_bwd(x, w, b, None, None, None, do, None, True, True)[:3]
        errs = [((g - r).norm() / r.norm()).item() for g, r in zip(got, want)]
        print(f"W{W} T{T}: relative error dx {errs[0]:.1e}, dweight {errs[1]:.1e}, dbias {errs[2]:.1e}")
        assert max(errs) < 1e-5


def asm():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import kernel_asm

    for W, BD, warps, vec in ((4, 256, 1, 8), (4, 128, 1, 4), (8, 128, 1, 4)):
        compiled = kernel_asm.compile_kernel(
            sliding_window_bwd, dict(x="*bf16", weight="*bf16", bias="*bf16", dout="*bf16", dx="*bf16",
                                     dw_partial="*fp32"),
            dict(W=W, BW=triton.next_power_of_2(W), BD=BD, CHUNK=64, VEC=vec), warps)
        sass = kernel_asm.sass_summary(compiled.asm["ptx"])
        per_thread = triton.next_power_of_2(W) * BD // (32 * warps)
        print(f"W{W} BD{BD} VEC{vec} warps {warps}: {sass.get('instructions')} SASS instructions (prologue included) "
              f"for {per_thread} elements per thread per block; {sass.get('ptxas')}")
        print("    ", ", ".join(f"{op} {n}" for op, n in sass.get("top", [])))


if __name__ == "__main__":
    asm() if "--asm" in sys.argv else check()
