"""Compile a Triton kernel of this package for an NVIDIA target on a machine without a GPU, and count what
matters in its PTX and SASS: instructions by opcode, barriers, shuffles, global and shared accesses,
registers and spills. No device time is needed to see layout conversions, spills or slow math.

    PYTHONPATH=$PWD python benchmarks/kernel_asm.py fwd --BT 8 --BD 128 --warps 1 [--W 4] [--mask]
    PYTHONPATH=$PWD python benchmarks/kernel_asm.py bwd --BT 32 --BD 64 --warps 2 [--contiguous]
    PYTHONPATH=$PWD python benchmarks/kernel_asm.py update --BD 256 --warps 4
    PYTHONPATH=$PWD python benchmarks/kernel_asm.py fwd_runs --BT 256 --BD 4 --R 8 --HR 8 --contiguous
    PYTHONPATH=$PWD python benchmarks/kernel_asm.py bwd_runs --BT 4 --BD 128 --R 4 --HR 4 --carry --vec 4 --warps 1
    PYTHONPATH=$PWD python benchmarks/kernel_asm.py bwd_runs --BT 128 --BD 4 --R 8 --HR 8 --warps 2 --contiguous
    ... --dump /tmp/k   (writes k.ptx and k.sass)

Inputs are described as bf16 tensors whose stride along the vectorised axis is 1 and whose pointers,
sizes and other strides are multiples of 16, which is what Triton specialises a real launch on. Needs a
Triton with `triton.compile(ASTSource, target=GPUTarget)` (3.6 and 3.9 work) whose wheel ships `ptxas`
and `cuobjdump` (PTX counts need neither). Counts are static: a loop body counts once.
"""
from __future__ import annotations

import argparse
import collections
import inspect
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from causal_conv1d_mps.triton.kernels import conv_bwd, conv_bwd_runs, conv_fwd, conv_fwd_runs, update

BF16 = "*bf16"


def compile_kernel(kernel, tensors: dict, constexprs: dict, num_warps: int, arch: int = 90):
    """`tensors`: pointer argument -> Triton type, or None for an absent optional input (a constexpr None)."""
    names = list(inspect.signature(kernel.fn).parameters)
    constexprs = dict(constexprs)
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in tensors and tensors[name] is None:
            constexprs[name] = None
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = tensors.get(name, "i32")
        if name in tensors or name in ("T", "D") or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    annotations = inspect.signature(kernel.fn).parameters
    missing = [n for n in names if "constexpr" in str(annotations[n].annotation) and n not in constexprs]
    if missing:
        raise SystemExit(f"constexprs not given: {missing}")
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))


def _opcode_counts(lines: list[str]) -> collections.Counter:
    counts = collections.Counter()
    for line in lines:
        match = re.match(r"\s*(?:@!?%?\w+\s+)?([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*)\s", line)
        if match and not line.lstrip().startswith(("//", ".")):
            counts[match.group(1)] += 1
    return counts


def ptx_summary(ptx: str) -> dict:
    ops = _opcode_counts(ptx.splitlines())
    total = sum(ops.values())

    def n(prefix):
        return sum(c for op, c in ops.items() if op.startswith(prefix))

    return dict(instructions=total, barriers=n("bar.sync") + n("barrier"), shuffles=n("shfl"),
                global_loads=n("ld.global"), global_stores=n("st.global"), shared_loads=n("ld.shared"),
                shared_stores=n("st.shared") + n("stmatrix"), top=ops.most_common(12))


def _tool(name: str) -> Path | None:
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for candidate in (name + "-blackwell", name):  # the newer ptxas reads the newer PTX versions
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def sass_summary(ptx: str, arch: int = 90, dump: str | None = None) -> dict:
    ptxas, cuobjdump = _tool("ptxas"), _tool("cuobjdump")
    if ptxas is None or cuobjdump is None:
        return dict(error="no ptxas/cuobjdump in the triton wheel")
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        run = subprocess.run([str(ptxas), f"-arch=sm_{arch}a", "-v", str(src), "-o", str(cubin)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            return dict(error=run.stderr.strip().splitlines()[-1])
        info = " | ".join(line.split(":", 1)[-1].strip() for line in run.stderr.splitlines()
                          if "registers" in line or "spill" in line)
        sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True).stdout
    if dump:
        Path(dump + ".sass").write_text(sass)
    ops = collections.Counter()
    for line in sass.splitlines():
        match = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if match:
            ops[match.group(1)] += 1
    return dict(ptxas=info, instructions=sum(ops.values()), top=ops.most_common(14))


def kernel_and_args(args):
    W = args.W
    flags = dict(ACTIVATION=True, HAS_BIAS=True, HAS_MASK=args.mask, HAS_SEQ_IDX=False, IS_VARLEN=False)
    time_major = args.contiguous
    if args.kernel in ("fwd", "fwd_runs"):
        strides = dict(stride_x_t=1, stride_o_t=1) if time_major else dict(stride_x_d=1, stride_o_d=1)
        tensors = dict(x=BF16, weight=BF16, bias=BF16, mask=BF16 if args.mask else None, seq_idx=None,
                       cu_seqlens=None, h0=None, out=BF16)
        constexprs = dict(**strides, W=W, BT=args.BT, BD=args.BD, **flags, HAS_RESIDUAL=not time_major,
                          USE_INITIAL_STATE=False, EVEN_D=True)
        if args.kernel == "fwd":
            return conv_fwd.conv_fwd_kernel, tensors, constexprs
        return conv_fwd_runs.conv_fwd_runs_kernel, tensors, dict(
            **constexprs, R=args.R, HR=args.HR or triton.next_power_of_2(max(W - 1, 1)),
            BW=triton.next_power_of_2(W))
    if args.kernel in ("bwd", "bwd_runs"):
        strides = (dict(stride_x_t=1, stride_do_t=1, stride_dx_t=1) if time_major
                   else dict(stride_x_d=1, stride_do_d=1, stride_dx_d=1))
        states = BF16 if args.states else None
        tensors = dict(x=BF16, weight=BF16, bias=BF16, mask=BF16 if args.mask else None, seq_idx=None,
                       cu_seqlens=None, h0=states, dout=BF16, dht=states, dx=BF16, dw_partial="*fp32",
                       scratch="*fp32")
        constexprs = dict(
            **strides, W=W, BT=args.BT, BH=triton.next_power_of_2(max(W - 1, 2)), BD=args.BD,
            BW=triton.next_power_of_2(W + 1), **flags, HAS_RESIDUAL=not time_major,
            USE_INITIAL_STATE=args.states, USE_FINAL_STATE_GRAD=args.states, EVEN_D=True,
            TIME_CONTIGUOUS=time_major)
        if args.kernel == "bwd":
            return conv_bwd.conv_bwd_kernel, tensors, constexprs
        halo = args.HR or triton.next_power_of_2(max(W - 1, 1))
        return conv_bwd_runs.conv_bwd_runs_kernel, tensors, dict(
            **constexprs, R=args.R, HR=halo, HF=halo, BK=triton.next_power_of_2(W), CARRY=args.carry, VEC=args.vec)
    tensors = dict(x=BF16, conv_state=BF16, weight=BF16, bias=BF16, cache_seqlens=None, state_indices=None,
                   out=BF16)
    return update.short_conv_update_kernel, tensors, dict(
        stride_x_d=1, stride_o_d=1, stride_s_s=1, W=W, BD=args.BD, BS=triton.next_power_of_2(max(W - 1, 2)),
        ACTIVATION=True, HAS_BIAS=True, HAS_RESIDUAL=True, IS_CIRCULAR=False, HAS_STATE_INDICES=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", choices=["fwd", "fwd_runs", "bwd", "bwd_runs", "update"])
    parser.add_argument("--W", type=int, default=4)
    parser.add_argument("--BT", type=int, default=32)
    parser.add_argument("--BD", type=int, default=64)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--R", type=int, default=8, help="*_runs: time steps per thread run")
    parser.add_argument("--HR", type=int, default=0,
                        help="*_runs: halo rows (bwd_runs: before and after a run; default next_pow2(W-1))")
    parser.add_argument("--carry", action="store_true", help="bwd_runs: walk back in time, carrying dpre rows")
    parser.add_argument("--vec", type=int, default=8, help="bwd_runs: channels per access on the run tiles")
    parser.add_argument("--mask", action="store_true", help="with an attention mask (fused op)")
    parser.add_argument("--states", action="store_true",
                        help="bwd*: with initial states and final-state gradients")
    parser.add_argument("--contiguous", action="store_true", help="(B, D, T) contiguous: time is the fast axis")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dump", help="write PREFIX.ptx and PREFIX.sass")
    args = parser.parse_args()
    kernel, tensors, constexprs = kernel_and_args(args)
    compiled = compile_kernel(kernel, tensors, constexprs, args.warps, args.arch)
    ptx = compiled.asm["ptx"]
    if args.dump:
        Path(args.dump + ".ptx").write_text(ptx)
    print(f"{args.kernel} W{args.W} BT{args.BT} BD{args.BD} warps {args.warps}"
          f"{' mask' if args.mask else ''}{' states' if args.states else ''}"
          f"{' contiguous' if args.contiguous else ' channel-last'}")
    ptx_info, sass_info = ptx_summary(ptx), sass_summary(ptx, args.arch, args.dump)
    print("PTX :", {k: v for k, v in ptx_info.items() if k != "top"})
    print("      top:", ", ".join(f"{op} {c}" for op, c in ptx_info["top"]))
    if "error" in sass_info:
        print("SASS:", sass_info["error"])
    else:
        print("SASS:", sass_info["instructions"], "instructions;", sass_info["ptxas"])
        print("      top:", ", ".join(f"{op} {c}" for op, c in sass_info["top"]))


if __name__ == "__main__":
    main()
