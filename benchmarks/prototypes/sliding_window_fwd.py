"""Prototype, not used by the package: a channel-last fused forward that loads and converts each input
element once and forms the W taps from registers (a sliding window), instead of re-loading the tile per
tap as `causal_conv1d_mps/triton/kernels/conv_fwd.py` does. Kept to be measured on a GPU
(docs/PERF_NOTES.md, "Lead for v5").

How it stays in registers in Triton, which has no register shift:
- `hist` is a `[BW, BD]` tile whose BW axis lies in each thread (one warp covers BD channels). Slot `s`
  holds the input row `t` with `t = s (mod BW)` counted from the program's first row. Time is unrolled by BW,
  so every write and every tap reads a slot known at compile time.
- A slot is read by a masked bitwise OR over the BW axis (`pick`): LLVM folds `x | 0`, so the pick costs
  nothing, where a float sum with zeros could not be folded (`-0.0 + 0.0`).
- `hist` starts as a 2-D load of the BW rows before the program's first row, so it has the layout of a
  coalesced row load and inserting a row needs no layout conversion.

    PYTHONPATH=$PWD python benchmarks/prototypes/sliding_window_fwd.py          # check under the interpreter
    PYTHONPATH=$PWD python benchmarks/prototypes/sliding_window_fwd.py --asm    # SASS counts (no GPU needed)
"""
from __future__ import annotations

import os
import sys

if "--asm" not in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernel below

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# decorated after TRITON_INTERPRET is set: interpreted (plain sigmoid) for the check, compiled for --asm
from causal_conv1d_mps.triton.kernels.common import sigmoid  # noqa: E402


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def pick(tile, o_w, slot: tl.constexpr):
    """Row `slot` of a float32 `[BW, BD]` tile whose BW axis is in-thread."""
    bits = tile.to(tl.int32, bitcast=True)
    return tl.reduce(tl.where(o_w[:, None] == slot, bits, 0), 0, _or).to(tl.float32, bitcast=True)


@triton.jit
def window_start(p_x, weight, bias, o_d, o_w, t0, stride_t, W: tl.constexpr, BW: tl.constexpr):
    """`(w_tile, b_bias, hist)`: the weights as a float32 `[BW, BD]` tile (row k = tap k), the bias, and the
    BW input rows before `t0` in slots 0..BW-1 (zeros before the start of x)."""
    w_tile = tl.load(weight + o_d[None, :] * W + o_w[:, None], mask=(o_w < W)[:, None], other=0.).to(tl.float32)
    b_bias = tl.load(bias + o_d).to(tl.float32)
    o_h = t0 - BW + o_w
    hist = tl.load(p_x[None, :] + o_h[:, None] * stride_t, mask=(o_h >= 0)[:, None], other=0.).to(tl.float32)
    return w_tile, b_bias, hist


@triton.jit
def sliding_window_fwd(x, weight, bias, out, T, stride_b, stride_t,
                       W: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr):
    """out[b, t] = x[b, t] + silu(bias + sum_k weight[:, k] * x[b, t - (W-1) + k]) for CHUNK rows per program.
    Assumes T % CHUNK == 0, CHUNK % BW == 0, D % BD == 0 and W <= BW (a prototype)."""
    i_c, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_d = i_d * BD + tl.arange(0, BD)
    o_w = tl.arange(0, BW)
    p_x = x + i_b.to(tl.int64) * stride_b + o_d
    p_o = out + i_b.to(tl.int64) * stride_b + o_d
    t0 = i_c * CHUNK
    w_tile, b_bias, hist = window_start(p_x, weight, bias, o_d, o_w, t0, stride_t, W, BW)
    for outer in range(0, CHUNK, BW):
        for j in tl.static_range(BW):
            t = t0 + outer + j
            row = tl.load(p_x + t * stride_t).to(tl.float32)
            hist = tl.where(o_w[:, None] == j, row[None, :], hist)
            acc = b_bias
            for k in tl.static_range(W):
                acc = tl.fma(pick(hist, o_w, (j - (W - 1) + k + BW) % BW), pick(w_tile, o_w, k), acc)
            y = acc * sigmoid(acc) + row
            tl.store(p_o + t * stride_t, y.to(out.dtype.element_ty))


def run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, BD: int, CHUNK: int, num_warps: int = 1):
    B, T, D = x.shape
    W = weight.shape[1]
    out = torch.empty_like(x)
    grid = (T // CHUNK, D // BD, B)
    sliding_window_fwd[grid](x, weight, bias, out, T, x.stride(0), x.stride(1), W=W,
                             BW=triton.next_power_of_2(W), BD=BD, CHUNK=CHUNK, num_warps=num_warps)
    return out


def check():
    from causal_conv1d_mps import reference

    torch.manual_seed(0)
    for W in (1, 2, 4, 5):
        x = torch.randn(2, 64, 32)
        w, b = torch.randn(32, W) * 0.5, torch.randn(32)
        got = run(x, w, b, BD=16, CHUNK=16)
        want, _ = reference.short_conv_fused_fwd(x, w, b, None, None, None, True, True, False)
        err = ((got - want).norm() / want.norm()).item()
        print(f"W{W}: relative error {err:.1e}")
        assert err < 1e-5


def asm():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import kernel_asm

    for W, BD, warps in ((4, 256, 1), (8, 256, 1), (16, 256, 1), (16, 128, 1)):
        compiled = kernel_asm.compile_kernel(
            sliding_window_fwd, dict(x="*bf16", weight="*bf16", bias="*bf16", out="*bf16"),
            dict(W=W, BW=triton.next_power_of_2(W), BD=BD, CHUNK=64), warps)
        sass = kernel_asm.sass_summary(compiled.asm["ptx"])
        per_thread = triton.next_power_of_2(W) * BD // (32 * warps)  # elements per unrolled block
        print(f"W{W} BD{BD} warps {warps}: {sass.get('instructions')} SASS instructions (prologue included) "
              f"for {per_thread} elements per thread per block; {sass.get('ptxas')}")
        print("    ", ", ".join(f"{op} {n}" for op, n in sass.get("top", [])))


if __name__ == "__main__":
    asm() if "--asm" in sys.argv else check()
