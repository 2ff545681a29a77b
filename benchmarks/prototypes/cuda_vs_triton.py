"""The shipped CUDA C++ kernels (`causal_conv1d_mps/cuda/`) against the Triton kernels they replace, through
the public API, in one run: `CAUSAL_CONV1D_CUDA_KERNELS=0` (read at every call) sends the same calls to
Triton. GPU times are medians of CUDA-event timings (`triton.testing.do_bench`) as % of a device copy;
forward + backward as % of the 5N-byte floor; host time per small call as the median wall time of
back-to-back calls with no synchronisation between them.

    PYTHONPATH=$PWD python benchmarks/prototypes/cuda_vs_triton.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import causal_conv1d_mps as ccmps  # noqa: E402
import cuda_fwd  # noqa: E402

DEV, BF16 = "cuda", torch.bfloat16
ROWS: list[dict] = []


def _use(cuda: bool) -> None:
    os.environ["CAUSAL_CONV1D_CUDA_KERNELS"] = "1" if cuda else "0"


def _copy_gbs() -> float:
    import triton.testing

    a = torch.randn(2**29, device=DEV, dtype=BF16)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() * 2 / (ms * 1e-3) / 1e9


def _bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def _host_us(fn, calls: int = 200) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def _row(kind, shape, W, ms_triton, ms_cuda, nbytes, copy, err):
    floor = nbytes / (copy * 1e9) * 1e3
    row = dict(kind=kind, shape=shape, W=W, triton_ms=ms_triton, cuda_ms=ms_cuda,
               triton_pct=100 * floor / ms_triton, cuda_pct=100 * floor / ms_cuda, max_rel_diff=err)
    ROWS.append(row)
    print(f"{kind:14s} {shape:18s} W{W:<2d} triton {ms_triton:8.4f} ms ({row['triton_pct']:5.1f}%)   "
          f"cuda {ms_cuda:8.4f} ms ({row['cuda_pct']:5.1f}%)   x{ms_triton / ms_cuda:4.2f}   diff {err:.1e}")


def channel_last_rows(copy: float) -> None:
    """The channel-last CUDA C++ forward (`cuda/launch_btd.py`) forced on for every width against the Triton
    kernels: `short_conv_fused` with an HF-style mask and the residual, and `causal_conv1d` on a channel-last x."""
    from causal_conv1d_mps.cuda import launch_btd

    every = frozenset((m, W) for m in (False, True) for W in range(1, launch_btd.MAX_WIDTH + 1))
    saved = launch_btd.MEASURED_FASTER
    for (B, T, D) in ((4, 8192, 4096), (8, 2048, 4096)):
        for W in range(1, launch_btd.MAX_WIDTH + 1):
            g = torch.Generator(device=DEV).manual_seed(W)
            x = torch.randn(B, T, D, device=DEV, generator=g).to(BF16)
            w = (torch.randn(D, W, device=DEV, generator=g) * W ** -0.5).to(BF16)
            b = (torch.randn(D, device=DEV, generator=g) * 0.5).to(BF16)
            am = torch.ones(B, T, device=DEV, dtype=torch.int64)
            am[0, : T // 8] = 0
            xt = x.transpose(1, 2)
            for kind, fn in (("fused mask", lambda: ccmps.short_conv_fused(x, w, b, am)),
                             ("channel-last", lambda: ccmps.causal_conv1d(xt, w, b, "silu"))):
                with torch.no_grad():
                    _use(False)
                    ref = fn()
                    ms_t = _bench(fn)
                    _use(True)
                    launch_btd.MEASURED_FASTER = every
                    got = fn()
                    ms_c = _bench(fn)
                    launch_btd.MEASURED_FASTER = saved
                err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                _row(kind, f"B{B} T{T} D{D}", W, ms_t, ms_c, 2 * x.numel() * 2, copy, err)


def _bwd_variant(run: int, target_blocks: int, vec: int) -> None:
    """Launch the channel-last backward with `run` rows per batch (CC_BWD_RUN), `vec` channels per thread
    (CC_BWD_VEC) and chunks for about `target_blocks` blocks: the sweeps of the backward."""
    from causal_conv1d_mps.cuda import launch_btd

    launch_btd.backward_variant = lambda has_mask, residual, W: (vec, run)
    launch_btd._BWD_TARGET_BLOCKS = target_blocks
    launch_btd._backward_plans.clear()


def _bwd_inputs(B, T, D, W, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(B, T, D, device=DEV, generator=g).to(BF16)
    w = (torch.randn(D, W, device=DEV, generator=g) * W ** -0.5).to(BF16)
    b = (torch.randn(D, device=DEV, generator=g) * 0.5).to(BF16)
    mask = torch.ones(B, T, device=DEV)
    mask[0, : T // 8] = 0
    dout = torch.randn(B, T, D, device=DEV, generator=g).to(BF16)
    return x, w, b, mask, dout


def _bwd_ops(x, w, b, mask, dout, prefix: str = ""):
    """(name, call) of the channel-last backward's three ops through the backend: fused with the mask,
    fused without it, and `causal_conv1d` on the channel-last view."""
    from causal_conv1d_mps import _activation
    from causal_conv1d_mps.triton import backend

    silu = _activation.SILU
    xt, doutt = x.transpose(1, 2), dout.transpose(1, 2)
    return (
        (f"{prefix}fused mask",
         lambda: backend.short_conv_fused_bwd(x, w, b, mask, None, None, dout, None, silu, True)),
        (f"{prefix}fused", lambda: backend.short_conv_fused_bwd(x, w, b, None, None, None, dout, None, silu, True)),
        (f"{prefix}ch-last", lambda: backend.causal_conv1d_bwd(xt, w, b, None, None, doutt, None, silu)))


def backward_sweep(copy: float) -> None:
    """The channel-last backward's variants (rows per batch x channels per thread x target blocks), CUDA C++
    only, through the backend: the full grid at W = 4, the batch and vector choices at other widths."""
    from causal_conv1d_mps import _activation
    from causal_conv1d_mps.cuda import launch_btd
    from causal_conv1d_mps.triton import backend

    silu = _activation.SILU
    saved = launch_btd.BACKWARD_MEASURED_FASTER, launch_btd.backward_variant, launch_btd._BWD_TARGET_BLOCKS
    launch_btd.BACKWARD_MEASURED_FASTER = frozenset((m, W) for m in (False, True) for W in range(1, 17))
    _use(True)
    B, T, D = 8, 2048, 4096
    grid = [(4, vec, run, target) for vec in (2, 4) for run in (4, 8, 16) for target in (1024, 2048, 4096)]
    grid += [(W, vec, run, 1024) for W in (2, 3, 7, 8, 12, 16) for vec in (2, 4) for run in (4, 8)]
    for W, vec, run, target in grid:
        _bwd_variant(run, target, vec)
        x, w, b, mask, dout = _bwd_inputs(B, T, D, W, W)
        xt, doutt = x.transpose(1, 2), dout.transpose(1, 2)
        for kind, fn in (
                ("fused", lambda: backend.short_conv_fused_bwd(x, w, b, mask, None, None, dout, None, silu, True)),
                ("ch-last", lambda: backend.causal_conv1d_bwd(xt, w, b, None, None, doutt, None, silu))):
            ms = _bench(fn)
            _row(f"{kind} V{vec} R{run} b{target}", f"B{B} T{T} D{D}", W, ms, ms, 3 * x.numel() * 2, copy, 0.0)
    launch_btd.BACKWARD_MEASURED_FASTER, launch_btd.backward_variant, launch_btd._BWD_TARGET_BLOCKS = saved
    launch_btd._backward_plans.clear()


BWD_DC_SHAPES = ((8, 2048, 4096), (4, 8192, 4096))  # (B, T, D) of --backward-dc: issue 12's P3 shape first


def backward_dc(copy: float, budget_s: float) -> None:
    """The channel-last backward with the forward's techniques off and on (`launch_btd._BWD_COMPILED_D`: D
    compiled in; `_BWD_INSIDE`: chunks inside [0, T) without bounds checks), CUDA C++ only, through the
    backend (fused with a mask, fused without, plain channel-last), as % of the 3N-byte floor; each row also
    says whether dx, dweight and dbias have the same bits as with both off. Stops starting new rows once
    `budget_s` seconds have passed."""
    from causal_conv1d_mps.cuda import launch_btd

    saved = (launch_btd.BACKWARD_MEASURED_FASTER, launch_btd._BWD_COMPILED_D, launch_btd._BWD_INSIDE)
    launch_btd.BACKWARD_MEASURED_FASTER = frozenset((m, W) for m in (False, True) for W in range(1, 17))
    _use(True)
    start = time.perf_counter()
    variants = (("off", False, False), ("dc", True, False), ("dc+in", True, True))
    try:
        for (B, T, D) in BWD_DC_SHAPES:
            for W in (3, 4, 7, 8):
                x, w, b, mask, dout = _bwd_inputs(B, T, D, W, W)
                for kind, fn in _bwd_ops(x, w, b, mask, dout):
                    if time.perf_counter() - start > budget_s:
                        print(f"(budget of {budget_s:.0f} s spent: the remaining rows were not timed)")
                        return
                    base, line = None, f"{kind:10s} B{B} T{T} D{D} W{W:<2d}"
                    for name, compiled_d, inside in variants:
                        launch_btd._BWD_COMPILED_D, launch_btd._BWD_INSIDE = compiled_d, inside
                        launch_btd._backward_plans.clear()
                        got = [g.clone() for g in fn()[:3] if g is not None]
                        ms = _bench(fn)
                        pct = 100 * 3 * x.numel() * 2 / (copy * 1e9) * 1e3 / ms
                        same = base is None or all(torch.equal(g.isnan(), r.isnan()) and
                                                   torch.equal(g.nan_to_num(), r.nan_to_num())
                                                   for g, r in zip(got, base))
                        base = got if base is None else base
                        ROWS.append(dict(kind=f"bwd-dc {kind} {name}", shape=f"B{B} T{T} D{D}", W=W, cuda_ms=ms,
                                         cuda_pct=pct, same_bits=same))
                        line += f"   {name} {ms:7.4f} ms ({pct:5.1f}%){'' if same else ' BITS DIFFER'}"
                    print(line, flush=True)
    finally:
        launch_btd.BACKWARD_MEASURED_FASTER, launch_btd._BWD_COMPILED_D, launch_btd._BWD_INSIDE = saved
        launch_btd._backward_plans.clear()


def channel_last_backward_rows(copy: float) -> None:
    """The channel-last CUDA C++ backward (`launch_btd.conv_bwd_btd`) against the Triton backward, each through
    the backend's `short_conv_fused_bwd` / `causal_conv1d_bwd` (the forward is the same for both), as % of its
    3N-byte floor (read x and dout, write dx); then forward + backward from eager Python and in a CUDA graph,
    as % of the 5N-byte floor (issue 12's P3 shape first)."""
    from causal_conv1d_mps.cuda import launch_btd

    every = frozenset((m, W) for m in (False, True) for W in range(1, launch_btd.MAX_WIDTH + 1))
    saved = launch_btd.BACKWARD_MEASURED_FASTER
    _use(True)

    def both(fn):
        launch_btd.BACKWARD_MEASURED_FASTER = frozenset()
        ref = fn()
        ms_t = _bench(fn)
        launch_btd.BACKWARD_MEASURED_FASTER = every
        got = fn()
        ms_c = _bench(fn)
        launch_btd.BACKWARD_MEASURED_FASTER = saved
        err = max(((a.float() - r.float()).abs().max() / r.float().abs().max()).item()
                  for a, r in zip(got[:3], ref[:3]) if r.numel())
        return ms_t, ms_c, err

    for (B, T, D) in ((8, 2048, 4096),):
        for W in (1, 2, 3, 4, 5, 6, 7, 8):  # wider: Triton's compile times dominate the run (call 1: 1.6-3.5x)
            x, w, b, mask, dout = _bwd_inputs(B, T, D, W, W)
            for kind, fn in _bwd_ops(x, w, b, mask, dout, "bwd "):
                ms_t, ms_c, err = both(fn)
                _row(kind, f"B{B} T{T} D{D}", W, ms_t, ms_c, 3 * x.numel() * 2, copy, err)

    for (B, T, D, W) in ((8, 2048, 4096, 4), (8, 2048, 4096, 7), (2, 512, 2048, 4), (4, 8192, 4096, 4)):
        for am in (None, "mask"):
            x, w, b, mask, dout = _bwd_inputs(B, T, D, W, W + 1)
            am = None if am is None else mask.to(torch.int64)
            xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))

            def step():
                xg.grad = wg.grad = bg.grad = None
                ccmps.short_conv_fused(xg, wg, bg, am).backward(dout)

            launch_btd.BACKWARD_MEASURED_FASTER = frozenset()
            step()
            ref = [t.grad.float().clone() for t in (xg, wg, bg)]
            ms_t, graph_t = _bench(step), _bench(cuda_fwd.graphed(step))
            launch_btd.BACKWARD_MEASURED_FASTER = every
            step()
            got = [t.grad.float() for t in (xg, wg, bg)]
            ms_c, graph_c = _bench(step), _bench(cuda_fwd.graphed(step))
            launch_btd.BACKWARD_MEASURED_FASTER = saved
            err = max(((g_ - r).abs().max() / r.abs().max()).item() for g_, r in zip(got, ref))
            _row("fused fwd+bwd" + (" mask" if am is not None else ""), f"B{B} T{T} D{D}", W, ms_t, ms_c,
                 5 * x.numel() * 2, copy, err)
            _row("  in a graph", f"B{B} T{T} D{D}", W, graph_t, graph_c, 5 * x.numel() * 2, copy, err)



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--profile", action="store_true", help="cProfile of the small forward+backward calls")
    p.add_argument("--channel-last", action="store_true",
                   help="only the channel-last kernel (fused and channel-last forward, every width 1..16)")
    p.add_argument("--channel-last-backward", action="store_true",
                   help="only the channel-last backward (fused and channel-last) and fused forward + backward")
    p.add_argument("--backward-sweep", action="store_true",
                   help="only the channel-last backward's variants (CUDA C++ only)")
    p.add_argument("--backward-dc", action="store_true",
                   help="only the channel-last backward with D compiled in / inside chunks off and on (CUDA C++)")
    p.add_argument("--budget-s", type=float, default=80.0, help="--backward-dc: seconds after which no new row starts")
    args = p.parse_args(argv)
    copy = _copy_gbs()
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  copy {copy:.0f} GB/s")
    print("(% of copy: forward 2N bytes, forward + backward 5N bytes)")
    if args.backward_dc:
        print("(--backward-dc: % of the backward's 3N-byte floor)")
        backward_dc(copy, args.budget_s)
        if args.json:
            args.json.write_text(json.dumps(dict(copy_gbs=copy, rows=ROWS), indent=1))
        return 0
    if args.channel_last or args.channel_last_backward or args.backward_sweep:
        (channel_last_rows if args.channel_last else
         channel_last_backward_rows if args.channel_last_backward else backward_sweep)(copy)
        if args.json:
            args.json.write_text(json.dumps(dict(copy_gbs=copy, rows=ROWS), indent=1))
        return 0

    for (B, D, T) in ((4, 4096, 8192), (8, 2048, 4096), (8, 4096, 2048)):
        for W in (2, 3, 4, 7, 8, 9, 16):
            g = torch.Generator(device=DEV).manual_seed(W)
            x = torch.randn(B, D, T, device=DEV, generator=g).to(BF16)
            w = (torch.randn(D, W, device=DEV, generator=g) * W ** -0.5).to(BF16)
            b = (torch.randn(D, device=DEV, generator=g) * 0.5).to(BF16)
            fn = lambda: ccmps.causal_conv1d_fn(x, w, b, activation="silu")  # noqa: E731
            _use(False)
            ref = fn()
            ms_t = _bench(fn)
            _use(True)
            got = fn()
            ms_c = _bench(fn)
            err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            _row("forward", f"B{B} D{D} T{T}", W, ms_t, ms_c, 2 * x.numel() * 2, copy, err)

    for (B, D, T) in ((8, 4096, 2048), (2, 2048, 512), (4, 4096, 8192)):
        for W in (4, 8, 16):
            g = torch.Generator(device=DEV).manual_seed(W + 1)
            x = torch.randn(B, D, T, device=DEV, generator=g).to(BF16).requires_grad_(True)
            w = (torch.randn(D, W, device=DEV, generator=g) * W ** -0.5).to(BF16).requires_grad_(True)
            b = (torch.randn(D, device=DEV, generator=g) * 0.5).to(BF16).requires_grad_(True)
            dout = torch.randn(B, D, T, device=DEV, generator=g).to(BF16)

            def step():
                x.grad = w.grad = b.grad = None
                ccmps.causal_conv1d_fn(x, w, b, activation="silu").backward(dout)

            _use(False)
            step()
            ref = [t.grad.float().clone() for t in (x, w, b)]
            ms_t, graph_t = _bench(step), _bench(cuda_fwd.graphed(step))
            _use(True)
            step()
            got = [t.grad.float() for t in (x, w, b)]
            ms_c, graph_c = _bench(step), _bench(cuda_fwd.graphed(step))
            err = max(((g_ - r).abs().max() / r.abs().max()).item() for g_, r in zip(got, ref))
            _row("forward+back", f"B{B} D{D} T{T}", W, ms_t, ms_c, 5 * x.numel() * 2, copy, err)
            _row("  in a graph", f"B{B} D{D} T{T}", W, graph_t, graph_c, 5 * x.numel() * 2, copy, err)

    print("\nhost time per call (us), back-to-back, B1 D1024 T64 W4 bf16:")
    x = torch.randn(1, 1024, 64, device=DEV, dtype=BF16)
    w = torch.randn(1024, 4, device=DEV, dtype=BF16)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    dout = torch.randn_like(x)
    eager = torch.nn.functional.conv1d
    wc = w[:, None, :]
    for label, fn in (("forward", lambda: ccmps.causal_conv1d_fn(x, w, None, activation="silu")),
                      ("forward+backward", lambda: ccmps.causal_conv1d_fn(xg, wg, None, activation="silu").backward(dout))):
        _use(False)
        t = _host_us(fn)
        _use(True)
        c = _host_us(fn)
        print(f"  {label:18s} triton {t:7.1f}   cuda {c:7.1f}")
        ROWS.append(dict(kind="host_us", what=label, triton=t, cuda=c))
    e = _host_us(lambda: eager(x, wc, None, padding=3, groups=1024))
    print(f"  {'eager F.conv1d':18s} {e:7.1f}")
    ROWS.append(dict(kind="host_us", what="eager F.conv1d forward", eager=e))
    if args.profile:
        import cProfile
        import pstats

        for cuda in (False, True):
            _use(cuda)
            step = lambda: ccmps.causal_conv1d_fn(xg, wg, None, activation="silu").backward(dout)  # noqa: E731
            for _ in range(20):
                step()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                step()
            prof.disable()
            torch.cuda.synchronize()
            print(f"\n--- cProfile of 200 small forward+backward calls, {'cuda' if cuda else 'triton'} kernels")
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    if args.json:
        args.json.write_text(json.dumps(dict(copy_gbs=copy, rows=ROWS), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
