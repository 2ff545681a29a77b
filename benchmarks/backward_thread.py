"""Where a small `(B, D, T)` forward + backward's host time goes: the autograd engine's device thread.

    python benchmarks/backward_thread.py [--device cuda]

For CUDA tensors `.backward()` hands the graph to the engine's thread of that device, so the package's Python
backward (an `autograd.Function`) runs there, while eager `F.conv1d`'s backward is C++ throughout. Each row is
timed twice: with the engine's device threads on (what users get) and off (`set_multithreading_enabled(False)`:
the backward runs on the calling thread). Besides the total per call, the time spent inside the package's
backward body (`ops._CausalConv1dEager.backward`, measured inside it) shows whether the same Python code costs
more on the engine's thread. Figures: us per call, the best of 5 timings of back-to-back calls, each repeat
of the table printed (host figures move between runs; compare within one). On cpu the reference backend runs
the arithmetic, so only the structure of the table is meaningful there.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout, not installed

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import causal_conv1d_mps as ccmps  # noqa: E402
from causal_conv1d_mps import ops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_timing import Identity  # noqa: E402  (this folder: the scripts' shared helpers)


def timed_backward_body(record: list, threads: set):
    """Wraps the eager road's backward so that each call adds its own duration to `record` [seconds, calls]
    and its thread to `threads`; returns the original (to restore)."""
    original = ops._CausalConv1dEager.backward

    def backward(ctx, dout, dfinal=None):
        start = time.perf_counter()
        result = original(ctx, dout, dfinal)
        record[0] += time.perf_counter() - start
        record[1] += 1
        threads.add(threading.get_ident())
        return result

    ops._CausalConv1dEager.backward = staticmethod(backward)
    return original


def per_call_us(fn, calls: int, repeats: int, sync, record: list) -> tuple[float, float]:
    """(us per call, us per backward body) of the fastest of `repeats` timings of `calls` calls."""
    for _ in range(50):
        fn()
    best, best_body = float("inf"), 0.0
    for _ in range(repeats):
        sync()
        record[:] = [0.0, 0]
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        elapsed = (time.perf_counter() - start) / calls
        if elapsed < best:
            best, best_body = elapsed, record[0] / max(record[1], 1)
    return best * 1e6, best_body * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, default=1000, help="forward + backward calls per timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="times the whole table is measured")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    B, D, T, W = 1, 64, 128, 4
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, torch.bfloat16)  # noqa: E731
    x, w, b, dout = rand(B, D, T), rand(D, W), rand(D), rand(B, D, T)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    xe, we, be = (t.clone().requires_grad_() for t in (x, w.unsqueeze(1), b))
    xf, wf, bf = (t.clone().requires_grad_() for t in (rand(B, T, D), w, b))
    dout_btd = rand(B, T, D)
    rows = {
        "package fwd+bwd, bias": lambda: ccmps.causal_conv1d(xg, wg, bg, "silu").backward(dout),
        "package fwd+bwd, no bias": lambda: ccmps.causal_conv1d(xg, wg, None, "silu").backward(dout),
        "package fwd+bwd, only x requires grad": lambda: ccmps.causal_conv1d(xg, w, b, "silu").backward(dout),
        "eager fwd+bwd, bias": lambda: F.conv1d(xe, we, be, padding=W - 1, groups=D)[..., :T].backward(dout),
        "eager fwd+bwd, no bias": lambda: F.conv1d(xe, we, None, padding=W - 1, groups=D)[..., :T].backward(dout),
        "package fused (B,T,D) fwd+bwd, bias": lambda: ccmps.short_conv_fused(xf, wf, bf).backward(dout_btd),
        "identity Function fwd+bwd": lambda: Identity.apply(xg).backward(dout),
        "package forward alone (inputs require grad)": lambda: ccmps.causal_conv1d(xg, wg, bg, "silu"),
    }
    record, threads = [0.0, 0], set()
    original = timed_backward_body(record, threads)
    print(f"backward_thread: {device}, torch {torch.__version__}, [B, D, T] = [{B}, {D}, {T}], W {W}, bf16; "
          f"us per call, best of {args.repeats} x {args.calls} calls (forward alone: x4)")
    try:
        for round_ in range(args.rounds):
            for multithreading in (True, False):
                where = "on (device thread)" if multithreading else "off (calling thread)"
                print(f"\n# round {round_ + 1}, engine multithreading {where}")
                with torch.autograd.set_multithreading_enabled(multithreading):
                    for name, fn in rows.items():
                        calls = args.calls if "bwd" in name else 4 * args.calls
                        total, body = per_call_us(fn, calls, args.repeats, sync, record)
                        print(f"  {name:45} {total:7.1f} us   backward body {body:6.1f} us")
    finally:
        ops._CausalConv1dEager.backward = original
    print(f"\nthreads that ran the package's backward: {len(threads)} "
          f"(the calling thread among them: {threading.get_ident() in threads})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
