"""Host time per call of each layer of the Triton backend's Python path, without a GPU.

    python benchmarks/host_overhead.py                       # cpu, kernel launches replaced by a no-op
    python benchmarks/host_overhead.py --profile             # and a cProfile table of each public call
    python benchmarks/host_overhead.py --device cuda         # real launches on a GPU (same layers)

Small calls are host-bound (docs/PERFORMANCE.md, P5): what a user waits for is the Python and dispatcher
work between the call and the kernel launch. That work is the same on cpu and cuda tensors, so it can be
measured here without a GPU: the `triton` backend is forced on cpu tensors and the launch itself (Triton's
interpreter on cpu) is replaced by a stand-in that does what the cuda fast path does on a cache hit
(`_launch.cache_key`, the table lookup, a call with every argument) except the driver call. What the
stand-in cannot show is the compiled launcher's own cost (about 7 us on an H200 host, docs/PERF_NOTES.md).

Each workload prints its layers from the bottom up (launch, launcher, backend function, the op layer of
`ops.py`, the public function), so the difference between two rows is what one layer adds, and one eager
PyTorch call of the same size as the yardstick (PyTorch's own dispatch cost on this machine). Figures are
microseconds per call: the best of `--repeats` timings of `--calls` back-to-back calls. Compare rows within
one run only: the machine's load moves every figure.

Workloads: `causal_conv1d` forward `[B, D, T]`, its forward + backward, the autograd engine's share of one
(an identity `Function`, and the engine on the calling thread), `short_conv_fused` forward + backward
`[B, T, D]`, and the decode steps `causal_conv1d_update`, `short_conv_update` and the transformers
integration's `causal_conv1d_update` (`[B, D, 1]`, what LFM2 passes), on a `[B, D, W]` state. The CUDA C++
kernels' own launch path, layer by layer: `benchmarks/cuda_launch_overhead.py`.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

os.environ["CAUSAL_CONV1D_BACKEND"] = "triton"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout, not installed

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import causal_conv1d_mps as ccmps  # noqa: E402
from causal_conv1d_mps import _activation, ops  # noqa: E402
from causal_conv1d_mps.integrations import transformers as cc_hf  # noqa: E402
from causal_conv1d_mps.triton import _launch, launch_conv, launch_update  # noqa: E402
from causal_conv1d_mps.triton import backend as triton_backend  # noqa: E402
from host_timing import Identity, per_call_us  # noqa: E402  (this folder: the script's own)

try:  # checkouts before the CUDA C++ decode step (before/after comparisons)
    from causal_conv1d_mps.cuda import launch_update as cuda_update  # noqa: E402
except ImportError:
    cuda_update = None

SILU = _activation.SILU
# checkouts before `_launch.cache_key` existed built the same key inline (before/after comparisons)
_cache_key = getattr(_launch, "cache_key", None) or (
    lambda kernel, device, nw, constexprs, args: (kernel, device, nw, *constexprs.values(),
                                                 *map(_launch._arg_key, args)))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _NoOpCompiled:
    """Stands in for a compiled Triton kernel: `run` takes the launcher's arguments and does nothing."""

    def run(self, *args):
        pass


class StubLaunch:
    """`_launch.launch` as it runs on a cache hit on cuda, minus the driver call; remembers its last call."""

    def __init__(self):
        self.table: dict[tuple, _NoOpCompiled] = {}
        self.last = None

    def __call__(self, kernel, grid, args, constexprs, num_warps):
        self.last = (kernel, grid, args, constexprs, num_warps)
        key = _cache_key(kernel, args[0].get_device(), num_warps, constexprs, args)
        entry = self.table.get(key)
        if entry is None:
            compiled = _NoOpCompiled()
            entry = self.table[key] = (compiled.run, None, None, compiled)
        run, function, metadata, _ = entry
        run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, 0, function, metadata,
            None, None, None, *args, *constexprs.values())


def install_stub() -> StubLaunch:
    stub = StubLaunch()
    launch_conv.launch = stub
    launch_update.launch = stub
    return stub


def requiring_grad(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def workloads(args, device, dtype, stub):
    """name -> list of (layer, zero-argument callable); bottom layer first, eager yardstick last."""
    B, D, T, W = args.batch, args.dim, args.length, args.width
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    x_bdt, x_btd, w, b = rand(B, D, T), rand(B, T, D), rand(D, W), rand(D)
    w3 = w.unsqueeze(1)
    dout_bdt, dout_btd = rand(B, D, T), rand(B, T, D)
    result = {}

    def last_launch(fn):
        """The launch `fn` makes last, as a callable that repeats it (stand-in launch on cpu)."""
        fn()
        kernel, grid, a, constexprs, nw = stub.last
        return lambda: stub(kernel, grid, a, constexprs, nw)

    # causal_conv1d forward, no grad ----------------------------------------------------------------------
    strides = triton_backend._btd_strides(x_bdt)
    out = torch.empty_like(x_bdt)
    launcher = lambda: launch_conv.launch_forward(  # noqa: E731
        x_bdt, strides, out, strides, B, T, D, w, b, None, None, None, None, SILU, False, False)
    layers = []
    if stub is not None:
        layers.append(("launch (cache key + lookup + no-op run)", last_launch(launcher)))
    layers += [
        ("torch.empty_like(x)", lambda: torch.empty_like(x_bdt)),
        ("x.new_empty(0) (a placeholder, no longer made)", lambda: x_bdt.new_empty(0)),
        ("launcher launch_forward", launcher),
        ("backend causal_conv1d_fwd", lambda: triton_backend.causal_conv1d_fwd(x_bdt, w, b, None, None, SILU, False)),
        ("ops.causal_conv1d (eager road)", lambda: ops.causal_conv1d(x_bdt, w, b, None, None, SILU, False)),
        ("custom op torch.ops (dispatcher)", lambda: ops.causal_conv1d_fwd(x_bdt, w, b, None, None, SILU, False)),
        ("api causal_conv1d", lambda: ccmps.causal_conv1d(x_bdt, w, b, "silu")),
        ("api causal_conv1d_fwd (forward only)", lambda: ccmps.causal_conv1d_fwd(x_bdt, w, b, True)),
        ("eager F.conv1d", lambda: F.conv1d(x_bdt, w3, b, padding=W - 1, groups=D)),
    ]
    result[f"causal_conv1d forward, no grad, [B, D, T] = [{B}, {D}, {T}], W {W}"] = layers

    # causal_conv1d forward + backward --------------------------------------------------------------------
    xg, wg, bg = requiring_grad(x_bdt, w, b)
    xe, we, be = requiring_grad(x_bdt, w3, b)
    result[f"causal_conv1d forward + backward, [B, D, T] = [{B}, {D}, {T}]"] = [
        ("backend causal_conv1d_bwd", lambda: triton_backend.causal_conv1d_bwd(
            x_bdt, w, b, None, None, dout_bdt, None, SILU)),
        ("backend causal_conv1d_bwd, no bias", lambda: triton_backend.causal_conv1d_bwd(
            x_bdt, w, None, None, None, dout_bdt, None, SILU)),
        ("api forward, inputs requiring grad", lambda: ccmps.causal_conv1d(xg, wg, bg, "silu")),
        ("api forward + .backward()", lambda: ccmps.causal_conv1d(xg, wg, bg, "silu").backward(dout_bdt)),
        ("eager F.conv1d forward + .backward()",
         lambda: F.conv1d(xe, we, be, padding=W - 1, groups=D)[..., :T].backward(dout_bdt)),
    ]

    # where a forward + backward's host time goes: the autograd engine's round trip for a Python Function
    # (identity), the same with the engine's device threads off (the backward runs on the calling thread)
    xi = xg.detach().clone().requires_grad_()
    result[f"autograd engine, [B, D, T] = [{B}, {D}, {T}]"] = [
        ("identity Function forward + .backward()", lambda: Identity.apply(xi).backward(dout_bdt)),
        ("eager x * 1 forward + .backward()", lambda: (xi * 1).backward(dout_bdt)),
        ("api forward + .backward(), engine on this thread", lambda: _single_thread(
            lambda: ccmps.causal_conv1d(xg, wg, bg, "silu").backward(dout_bdt))),
        ("eager F.conv1d fwd + .backward(), engine on this thread", lambda: _single_thread(
            lambda: F.conv1d(xe, we, be, padding=W - 1, groups=D)[..., :T].backward(dout_bdt))),
    ]

    # short_conv_fused forward + backward -----------------------------------------------------------------
    xf, wf, bf = requiring_grad(x_btd, w, b)
    xfe, wfe, bfe = requiring_grad(x_btd, w3, b)
    result[f"short_conv_fused forward + backward, [B, T, D] = [{B}, {T}, {D}]"] = [
        ("backend short_conv_fused_fwd", lambda: triton_backend.short_conv_fused_fwd(
            x_btd, w, b, None, None, None, SILU, True, False)),
        ("backend short_conv_fused_bwd", lambda: triton_backend.short_conv_fused_bwd(
            x_btd, w, b, None, None, None, dout_btd, None, SILU, True)),
        ("ops.short_conv_fused (eager road)", lambda: ops.short_conv_fused(
            x_btd, w, b, None, None, None, SILU, True, False)),
        ("api short_conv_fused, inputs not requiring grad", lambda: ccmps.short_conv_fused(x_btd, w, b)),
        ("api forward, no grad", lambda: ccmps.short_conv_fused_fwd_only(x_btd, w, b)),
        ("api forward, inputs requiring grad", lambda: ccmps.short_conv_fused(xf, wf, bf)),
        ("api forward + .backward()", lambda: ccmps.short_conv_fused(xf, wf, bf).backward(dout_btd)),
        ("eager F.conv1d forward + .backward()",
         lambda: F.conv1d(xfe.transpose(1, 2), wfe, bfe, padding=W - 1, groups=D)[..., :T].backward(
             dout_btd.transpose(1, 2))),
    ]

    # decode steps ----------------------------------------------------------------------------------------
    Wd = args.decode_width
    wd, bd = rand(D, Wd), rand(D)
    token_bd, token_bd1 = rand(B, D), rand(B, D, 1)
    state_a, state_b, state_c = (torch.zeros(B, D, Wd, device=device, dtype=dtype) for _ in range(3))
    x3 = token_bd.unsqueeze(1)
    update = lambda: launch_update.launch_update(x3, state_a, wd, bd, None, None, SILU, False)  # noqa: E731
    layers = []
    if stub is not None:
        layers.append(("launch (cache key + lookup + no-op run)", last_launch(update)))
    layers.append(("launcher launch_update (Triton)", update))
    if cuda_update is not None and cuda_update.why_not(x3, state_a, wd, bd, SILU) is None and device.type == "cuda":
        layers.append(("CUDA C++ launcher conv_update", lambda: cuda_update.conv_update(
            x3, state_a, wd, bd, SILU, False)))
    layers += [
        ("backend short_conv_update", lambda: triton_backend.short_conv_update(
            x3, state_a, wd, bd, None, None, SILU, False)),
        ("ops.short_conv_update (eager road)", lambda: ops.short_conv_update(
            x3, state_a, wd, bd, None, None, SILU, False)),
        ("api causal_conv1d_update [B, D]", lambda: ccmps.causal_conv1d_update(token_bd, state_a, wd, bd, "silu")),
        ("api short_conv_update [B, D]", lambda: ccmps.short_conv_update(token_bd, state_b, wd, bd)),
        ("transformers integration [B, D, 1]", lambda: cc_hf.causal_conv1d_update(token_bd1, state_c, wd, None)),
        ("eager F.conv1d on the [B, D, W] window", lambda: F.conv1d(state_c, wd.unsqueeze(1), None, groups=D)),
        ("transformers' own update (cat, copy_, conv1d, slice)", lambda: _transformers_update(token_bd1, state_c, wd)),
    ]
    result[f"decode step, B {B} D {D} W {Wd}, state [B, D, W]"] = layers
    return result


def _single_thread(step):
    with torch.autograd.set_multithreading_enabled(False):
        step()


def _transformers_update(x, state, weight):
    """What transformers 5.x's PyTorch `causal_conv1d_update` does for one token (LFM2, no activation)."""
    full = torch.cat([state, x], dim=-1).to(weight.dtype)
    state.copy_(full[:, :, -state.shape[-1]:])
    return F.conv1d(full, weight.unsqueeze(1), None, groups=x.shape[1])[:, :, -x.shape[-1]:].to(x.dtype)


def profile_table(fn, calls: int, rows: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(rows)
    return stream.getvalue()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (stand-in launch, the default) or cuda (real launches)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--decode-width", type=int, default=3, help="LFM2's conv width")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--clock", choices=("thread", "wall"), default=None,
                   help="thread: this thread's CPU time (default on cpu: other processes on a shared machine "
                        "barely move it); wall: perf_counter (default on cuda, where waiting for the GPU counts)")
    p.add_argument("--only", default="", help="run only workloads whose name contains this text")
    p.add_argument("--profile", action="store_true", help="cProfile each workload's public call")
    p.add_argument("--profile-rows", type=int, default=18)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    # the stand-in launch leaves outputs and gradients uninitialised; accumulating denormal garbage into
    # `.grad` would time the CPU's slow denormal arithmetic, not the host path
    torch.set_flush_denormal(True)
    stub = install_stub() if device.type == "cpu" else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock_name = args.clock or ("wall" if device.type == "cuda" else "thread")
    clock = time.thread_time if clock_name == "thread" else time.perf_counter
    print(f"host_overhead: {device}, {dtype}, torch {torch.__version__}, "
          f"{'no-op stand-in launch' if stub else 'real launches'}; us per call ({clock_name} clock), best of "
          f"{args.repeats} x {args.calls} calls")
    with torch.inference_mode(False):
        for name, layers in workloads(args, device, dtype, stub).items():
            if args.only and args.only not in name:
                continue
            print(f"\n{name}")
            for layer, fn in layers:
                calls = args.calls // 4 if "backward" in layer else args.calls
                grad = "grad" in layer or "backward" in layer
                with torch.set_grad_enabled(grad):
                    us = per_call_us(fn, calls, args.repeats, sync, clock)
                print(f"  {layer:55} {us:8.1f}")
            if args.profile:
                public = [fn for layer, fn in layers if layer.startswith(("api", "transformers integration"))]
                for fn in public[-1:] if "decode" in name else public[-1:]:
                    with torch.set_grad_enabled(True):
                        print(profile_table(fn, args.calls // 4, args.profile_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
