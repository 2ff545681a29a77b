"""Host time per call of each layer of the CUDA C++ kernels' launch path, with or without a GPU.

    python benchmarks/cuda_launch_overhead.py                        # cpu tensors, no-op driver call
    python benchmarks/cuda_launch_overhead.py --compare /path/to/other/checkout   # both, side by side
    python benchmarks/cuda_launch_overhead.py --device cuda          # real launches on a GPU
    python benchmarks/cuda_launch_overhead.py --device cuda --compare main   # a git ref works too

Small calls are host-bound (docs/PERFORMANCE.md, P5). The Python work of `causal_conv1d_mps.cuda.launch`
is the same on cpu and cuda tensors, so on `--device cpu` it runs on cpu tensors with the GPU parts stood
in: the kernel "compile" returns a `_runtime._DriverKernel` whose `cuLaunchKernel` is a C function of the
same signature that returns 0 (compiled here with clang into a temporary directory), and the current device
and stream queries are C-level stand-ins (bound `int` methods returning -1 and 0, about what the real
queries cost). What the stand-ins cannot show is the driver's own time in `cuLaunchKernel` (a few us on an
H200 host) and the CUDA caching allocator's (`torch.empty_like` costs about 4 us there, 1 us here).

Layers are printed from the bottom up, so the difference between two rows is what one layer adds. Figures are
microseconds per call: the best of `--repeats` timings of `--calls` back-to-back calls (this thread's CPU
time on cpu, wall time on cuda). Compare rows within one run only. `--compare OTHER` times the same layers
of another checkout (a directory, or a git ref of this repository exported to a temporary directory) in
alternating rounds of subprocesses and prints both columns; a layer a checkout lacks prints as "-".
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from host_timing import per_call_us  # this folder: the script's own, whichever checkout is timed

ROOT = Path(__file__).resolve().parent.parent
NOOP_SOURCE = """
int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared, void* stream, void** params, void** extra) { return 0; }
"""


def _noop_library(workdir: str) -> ctypes.CDLL:
    """A shared library whose `cuLaunchKernel` does nothing and returns CUDA_SUCCESS."""
    compiler = next((c for c in ("clang-16", "clang", "cc", "gcc") if shutil.which(c)), None)
    if compiler is None:
        raise SystemExit("cuda_launch_overhead: no C compiler (clang, cc) for the no-op cuLaunchKernel")
    source, library = Path(workdir, "noop_launch.c"), Path(workdir, "libnoop_launch.so")
    source.write_text(NOOP_SOURCE)
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return ctypes.CDLL(str(library))


class _FakeCompiled:
    """What `torch.cuda._compile_kernel` returns, as far as `_DriverKernel` reads it."""

    func = ctypes.c_void_p(0x1000)


def install_stand_ins(runtime, workdir: str) -> None:
    """The GPU parts of `_runtime` replaced (cpu tensors): a no-op driver call, device -1, stream 0."""
    import torch

    lib = _noop_library(workdir)
    lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    runtime._libcuda = lib  # checkouts with prepared launches derive their call from it (`_load_driver`)
    runtime._compile = lambda name, defines, device, index: runtime._DriverKernel(_FakeCompiled(), index)
    device_query, stream_query = (-1).__int__, (0).__mul__  # C-level: () -> -1, (device) -> 0
    torch.cuda.current_device = device_query  # the checkouts before launch plans ask these two
    torch._C._cuda_getCurrentRawStream = stream_query
    for name, stand_in in (("_current_device", device_query), ("_current_stream", stream_query)):
        if hasattr(runtime, name):
            setattr(runtime, name, stand_in)


def _forward_variant(cuda_launch, T: int, W: int):
    """(the forward kernel's layout defines, vectors per thread, threads per block) as this checkout's launcher
    chooses them (checkouts before `forward_layout` had `forward_vectors` and a fixed block)."""
    if hasattr(cuda_launch, "forward_layout"):
        vectors, threads = cuda_launch.forward_layout(T, W)
        return dict(CC_VPT=vectors, CC_FWD_THREADS=threads), vectors, threads
    vectors = cuda_launch.forward_vectors(T, W)
    return dict(CC_VPT=vectors), vectors, cuda_launch.THREADS


def layers(args, device):
    """(layer, zero-argument callable) from the driver call up to the public function."""
    import torch

    import causal_conv1d_mps as ccmps
    from causal_conv1d_mps import _activation
    from causal_conv1d_mps.cuda import _runtime
    from causal_conv1d_mps.cuda import launch as cuda_launch
    from causal_conv1d_mps import ops
    from causal_conv1d_mps import triton as triton_package
    from causal_conv1d_mps.triton import backend

    try:  # the channel-last launcher (checkouts before it lack the fused rows)
        from causal_conv1d_mps.cuda import launch_btd
    except ImportError:
        launch_btd = None

    SILU = _activation.SILU
    on_cpu = device.type == "cpu"
    B, D, T, W = args.batch, args.dim, args.length, args.width
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    g = torch.Generator().manual_seed(0)
    x, dout = (torch.randn(B, D, T, generator=g).to(device, dtype) for _ in range(2))
    w = torch.randn(D, W, generator=g).to(device, dtype)
    b = torch.randn(D, generator=g).to(device, dtype)
    if cuda_launch.why_not(x, w, b, SILU) is not None:
        raise SystemExit(f"the CUDA C++ kernels do not take this call: {cuda_launch.why_not(x, w, b, SILU)}")

    fwd, bwd = cuda_launch.conv_fwd_bdt, cuda_launch.conv_bwd_bdt
    fwd_btd = getattr(launch_btd, "conv_fwd_btd", None) if launch_btd is not None else None
    if on_cpu:  # the backend asks the launchers without allow_cpu: let cpu tensors through
        cuda_launch.conv_fwd_bdt = functools.partial(fwd, allow_cpu=True)
        cuda_launch.conv_bwd_bdt = functools.partial(bwd, allow_cpu=True)
        if fwd_btd is not None:
            launch_btd.conv_fwd_btd = functools.partial(fwd_btd, allow_cpu=True)
    if fwd(x, w, b, SILU, allow_cpu=on_cpu) is None or bwd(x, w, b, dout, SILU, allow_cpu=on_cpu) is None:
        raise SystemExit(f"the CUDA C++ launchers declined: {_runtime.unavailable_reason(device)}")
    served, launcher = [], cuda_launch.conv_fwd_bdt

    def spy(*a, **k):
        served.append(launcher(*a, **k))
        return served[-1]
    cuda_launch.conv_fwd_bdt = spy
    backend.causal_conv1d_fwd(x, w, b, None, None, SILU, False)
    cuda_launch.conv_fwd_bdt = launcher
    if len(served) != 1 or served[0] is None:
        raise SystemExit("the backend did not take the CUDA C++ forward for this call")

    # the forward kernel and the argument buffer of one general call, for the bare driver-call layers
    layout, vectors, threads = _forward_variant(cuda_launch, T, w.shape[1])
    fn = _runtime.kernel("cc_conv_fwd_bdt", dict(cuda_launch._defines(x, w, b, SILU), **layout), x.device)
    out = torch.empty_like(x)
    n8 = T // 8
    grid, block = (-(-n8 // (threads * vectors)), D, B), (threads, 1, 1)
    x_strides = cuda_launch._check(x, w, b, SILU)[1]
    general_args = [x, w, b, out, n8, *x_strides, *x_strides, *cuda_launch._weight_strides(w, b)]
    fn(grid=grid, block=block, args=general_args)
    params = next(iter(fn._layouts.values())).params
    index = x.device.index if x.device.index is not None else -1
    stream = 0 if on_cpu else torch._C._cuda_getCurrentRawStream(index)
    address = ctypes.cast(_runtime._libcuda.cuLaunchKernel, ctypes.c_void_p).value
    keeping_gil = ctypes.PYFUNCTYPE(ctypes.c_int)(address)
    releasing_gil = ctypes.CFUNCTYPE(ctypes.c_int)(address)
    prepared = (ctypes.c_void_p(fn._func), *grid, *block, 0, ctypes.c_void_p(stream), params, None)
    lib = _runtime._libcuda
    current_device = getattr(_runtime, "_current_device", None) or torch.cuda.current_device
    current_stream = getattr(_runtime, "_current_stream", None) or torch._C._cuda_getCurrentRawStream

    result = [
        ("cuLaunchKernel, argtypes, ints (the general call)",
         lambda: lib.cuLaunchKernel(fn._func, *grid, *block, 0, stream, params, None)),
        ("cuLaunchKernel, no argtypes, prepared tuple, GIL kept", lambda: keeping_gil(*prepared)),
        ("cuLaunchKernel, no argtypes, prepared tuple, GIL released", lambda: releasing_gil(*prepared)),
        ("device + stream queries", lambda: (current_device(), current_stream(index))),
        ("kernel(grid, block, args), arguments ready", lambda: fn(grid=grid, block=block, args=general_args)),
    ]
    plans = getattr(cuda_launch, "_forward_plans", None)
    if plans:
        plan = next(p for p in plans.values() if p is not None)
        pointers = (x.data_ptr(), w.data_ptr(), b.data_ptr(), out.data_ptr())
        result.append(("launch plan's prepared launch, pointers ready", lambda: plan.launch(*pointers)))
    xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, w, b))
    result += [
        ("torch.empty_like(x)", lambda: torch.empty_like(x)),
        ("launch.why_not (the applicability check)", lambda: cuda_launch.why_not(x, w, b, SILU)),
        ("launch.conv_fwd_bdt", lambda: fwd(x, w, b, SILU, allow_cpu=on_cpu)),
        ("backend causal_conv1d_fwd", lambda: backend.causal_conv1d_fwd(x, w, b, None, None, SILU, False)),
        ("triton package's causal_conv1d_fwd (what ops calls)",
         lambda: triton_package.causal_conv1d_fwd(x, w, b, None, None, SILU, False)),
        ("ops.causal_conv1d, no grad", lambda: ops.causal_conv1d(x, w, b, None, None, SILU, False)),
        ("api causal_conv1d, no grad", lambda: ccmps.causal_conv1d(x, w, b, "silu")),
        ("launch.conv_bwd_bdt (1 launch at B 1, T <= 1024)", lambda: bwd(x, w, b, dout, SILU, allow_cpu=on_cpu)),
        ("backend causal_conv1d_bwd", lambda: backend.causal_conv1d_bwd(x, w, b, None, None, dout, None, SILU)),
        ("launch.conv_bwd_bdt, no bias", lambda: bwd(x, w, None, dout, SILU, allow_cpu=on_cpu)),
        ("backend causal_conv1d_bwd, no bias",
         lambda: backend.causal_conv1d_bwd(x, w, None, None, None, dout, None, SILU)),
        ("api forward + .backward()", lambda: ccmps.causal_conv1d(xg, wg, bg, "silu").backward(dout)),
        ("api forward + .backward(), no bias", lambda: ccmps.causal_conv1d(xg, wg, None, "silu").backward(dout)),
    ]
    result += _fused_layers(args, ccmps, ops, backend, triton_package, launch_btd, fwd_btd, x, w, b, SILU, on_cpu)
    result += _decode_layers(ccmps, ops, backend, x, w, b, SILU, on_cpu)
    return result


def _decode_layers(ccmps, ops, backend, x, w, b, SILU, on_cpu):
    """One decode step `[B, 1, D]` on a `[B, D, W]` state (bias, SiLU, no residual) through the CUDA C++ decode
    kernel, layer by layer, beside the Triton launcher; none where this checkout or the call does not take it."""
    import torch

    try:
        from causal_conv1d_mps.cuda import launch_update as cuda_update
    except ImportError:  # checkouts before the CUDA C++ decode step
        return []
    from causal_conv1d_mps.triton import launch_update as triton_update

    token = x[:, :, 0].contiguous()
    x3 = token.unsqueeze(1)
    state = torch.zeros(x.shape[0], x.shape[1], w.shape[1], device=x.device, dtype=x.dtype)
    if cuda_update.conv_update(x3, state, w, b, SILU, False, allow_cpu=on_cpu) is None:
        return []
    if on_cpu:  # the backend asks without allow_cpu
        cuda_update.conv_update = functools.partial(cuda_update.conv_update, allow_cpu=True)
    rows = [("launch_update.conv_update (decode)", lambda: cuda_update.conv_update(x3, state, w, b, SILU, False)),
            ("backend short_conv_update", lambda: backend.short_conv_update(x3, state, w, b, None, None, SILU, False)),
            ("ops.short_conv_update", lambda: ops.short_conv_update(x3, state, w, b, None, None, SILU, False)),
            ("api causal_conv1d_update [B, D]", lambda: ccmps.causal_conv1d_update(token, state, w, b, "silu"))]
    if not on_cpu:  # the Triton launcher runs its kernel only on a GPU (no stand-in for it here)
        rows.insert(1, ("Triton launch_update (decode)", lambda: triton_update.launch_update(
            x3, state, w, b, None, None, SILU, False)))
    return rows


def _fused_layers(args, ccmps, ops, backend, triton_package, launch_btd, fwd_btd, x, w, b, SILU, on_cpu):
    """The forward of `short_conv_fused` `[B, T, D]` (bias, SiLU, residual, no mask) through the channel-last
    CUDA C++ kernel, layer by layer; none where this checkout or the call does not take that kernel."""
    import torch

    if fwd_btd is None:
        return []
    x_btd = x.transpose(1, 2).contiguous()
    out = torch.empty_like(x_btd)
    if not (launch_btd.preferred(False, w.shape[1]) and launch_btd.why_not(x_btd, w, b, None, SILU) is None
            and fwd_btd(x_btd, w, b, None, SILU, True, out, allow_cpu=on_cpu)):
        return []
    return [
        ("launch_btd.conv_fwd_btd (fused, channel-last)",
         lambda: fwd_btd(x_btd, w, b, None, SILU, True, out, allow_cpu=on_cpu)),
        ("backend short_conv_fused_fwd", lambda: backend.short_conv_fused_fwd(
            x_btd, w, b, None, None, None, SILU, True, False)),
        ("triton package's short_conv_fused_fwd", lambda: triton_package.short_conv_fused_fwd(
            x_btd, w, b, None, None, None, SILU, True, False)),
        ("ops.short_conv_fused, no grad", lambda: ops.short_conv_fused(x_btd, w, b, None, None, None, SILU, True,
                                                                       False)),
        ("api short_conv_fused, no grad", lambda: ccmps.short_conv_fused(x_btd, w, b)),
    ]


def measure(args) -> dict[str, float]:
    """Import the package of `args.checkout` (this process only), stand the GPU in on cpu, time each layer."""
    sys.path.insert(0, str(Path(args.checkout).resolve()))
    os.environ["CAUSAL_CONV1D_BACKEND"] = "triton"
    import torch

    import causal_conv1d_mps
    from causal_conv1d_mps.cuda import _runtime

    loaded = Path(causal_conv1d_mps.__file__).resolve().parent.parent
    if loaded != Path(args.checkout).resolve():
        raise SystemExit(f"imported causal_conv1d_mps from {loaded}, not from {args.checkout}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # the no-op launch leaves gradients uninitialised: no denormal arithmetic
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    with tempfile.TemporaryDirectory() as workdir:
        if device.type == "cpu":
            install_stand_ins(_runtime, workdir)
        figures = {}
        for layer, fn in layers(args, device):
            grad = "backward" in layer
            calls = args.calls // 4 if grad or "bwd" in layer else args.calls
            with torch.set_grad_enabled(grad):
                figures[layer] = per_call_us(fn, calls, args.repeats, sync, clock)
    return figures


def _export(ref: str, workdir: str) -> str:
    """`ref` if it is a directory, else that git ref of this repository exported into `workdir`."""
    if Path(ref).is_dir():
        return ref
    target = Path(workdir, "compare")
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return str(target)


def _describe(checkout: str) -> str:
    head = subprocess.run(["git", "-C", checkout, "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return f"{checkout} ({head.stdout.strip()[:60]})" if head.returncode == 0 else checkout


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (no-op driver call, the default) or cuda (real launches)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--calls", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--checkout", default=str(ROOT), help="the repository whose package is timed (default: this)")
    p.add_argument("--compare", default=None, metavar="DIR_OR_GIT_REF",
                   help="also time another checkout (a directory, or a git ref of this repository)")
    p.add_argument("--rounds", type=int, default=3, help="with --compare: alternating rounds, best of each")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # a --compare round's child
    return p.parse_args(argv)


def _child(args, checkout: str) -> dict[str, float]:
    argv = [sys.executable, __file__, "--json", "--checkout", checkout]
    for name in ("device", "dtype", "batch", "dim", "length", "width", "calls", "repeats", "threads"):
        argv += [f"--{name}", str(getattr(args, name))]
    done = subprocess.run(argv, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.json:
        print(json.dumps(measure(args)))
        return 0
    shape = f"[B, D, T] = [{args.batch}, {args.dim}, {args.length}], W {args.width}, {args.dtype}, SiLU, bias"
    clock = "wall clock, real launches" if args.device == "cuda" else "thread CPU time, no-op driver call"
    print(f"cuda_launch_overhead: {args.device}, {shape}; us per call ({clock}), best of {args.repeats} x "
          f"{args.calls} calls (backward rows: {args.calls // 4})")
    with tempfile.TemporaryDirectory() as workdir:
        checkouts = [args.checkout] + ([_export(args.compare, workdir)] if args.compare else [])
        best: list[dict[str, float]] = [{} for _ in checkouts]
        for _ in range(args.rounds if args.compare else 1):
            for i, checkout in enumerate(checkouts):
                for layer, us in _child(args, checkout).items():
                    best[i][layer] = min(us, best[i].get(layer, float("inf")))
        names = [args.checkout] + ([args.compare] if args.compare else [])
        for i, checkout in enumerate(checkouts):
            print(f"  [{i + 1}] {_describe(checkout) if Path(names[i]).is_dir() else names[i]}")
    rows = list(dict.fromkeys(layer for figures in best for layer in figures))
    print(f"\n  {'layer':58}" + "".join(f"{f'[{i + 1}]':>9}" for i in range(len(best))))
    for layer in rows:
        cells = "".join(f"{figures[layer]:9.2f}" if layer in figures else f"{'-':>9}" for figures in best)
        print(f"  {layer:58}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
