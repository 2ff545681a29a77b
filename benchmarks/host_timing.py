"""Host time per call of back-to-back calls, shared by the host-overhead benchmarks (`host_overhead.py`,
`cuda_launch_overhead.py`, `backward_thread.py`), and the cheapest autograd Function they time as a yardstick.
It imports nothing of the package: `cuda_launch_overhead.py --compare` runs it beside another checkout's
package."""
from __future__ import annotations

import torch


def per_call_us(fn, calls: int, repeats: int, sync, clock) -> float:
    """Microseconds per call of `fn`: the best of `repeats` timings of `calls` back-to-back calls (after up to
    50 warm-up calls), each timing between two `sync()` calls and read from `clock`."""
    for _ in range(min(calls, 50)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = clock()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, clock() - start)
    return best / calls * 1e6


class Identity(torch.autograd.Function):
    """The cheapest Python autograd Function: what the engine's round trip costs by itself."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dout):
        return dout
