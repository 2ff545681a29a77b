"""Per-call time of back-to-back calls, measured the way each device needs.

A repetition times a batch of consecutive calls (several when one call is short), so a figure
is the time per call of a program that calls the op in a loop: launch overhead included where
the device outruns the host. CUDA uses events around the batch; MPS synchronizes around it
(`torch.mps.synchronize()`); CPU reads `time.perf_counter`. Calls rotate over several input
sets so that large shapes are read from memory, not from the L2/SLC cache. The result is the
median over repetitions, with the standard deviation as a percentage of it.

With `--cuda-graphs` one call per input set is captured into one CUDA graph, which is replayed instead
(`graph_replays`), and its time divided by its calls: the figure of a program that runs the op under graphs,
without Python's host time per call, which is what a GPU-bound training or decode loop sees.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class Plan:
    warmup: int  # calls before timing (also triggers compilation and autotuning)
    rep_seconds: float  # aim for one repetition (a batch of calls) to last this long
    min_reps: int
    max_reps: int
    budget_seconds: float  # stop adding repetitions past this much time per measurement


FULL = Plan(warmup=5, rep_seconds=5e-3, min_reps=10, max_reps=100, budget_seconds=1.0)
QUICK = Plan(warmup=1, rep_seconds=2e-4, min_reps=3, max_reps=3, budget_seconds=0.02)


@dataclass(frozen=True)
class Timing:
    seconds: float  # median time per call
    stdev_pct: float  # standard deviation of the repetitions, % of the median
    reps: int
    calls_per_rep: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Clock:
    """Times one batch of calls on `device`, rotating through `sets`."""

    def __init__(self, device: torch.device):
        self.device = device
        self._next = 0

    def batch(self, call: Callable, sets: Sequence, calls: int) -> float:
        start_index, n = self._next, len(sets)
        self._next = (self._next + calls) % n
        synchronize(self.device)
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(calls):
                call(sets[(start_index + i) % n])
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        for i in range(calls):
            call(sets[(start_index + i) % n])
        synchronize(self.device)  # no-op on CPU
        return time.perf_counter() - begin


def measure(call: Callable, sets: Sequence, device: torch.device, plan: Plan) -> Timing:
    clock = Clock(device)
    clock.batch(call, sets, max(plan.warmup, 1))
    # Grow the batch until it is long enough to time, then size it to rep_seconds.
    calls, elapsed = 1, clock.batch(call, sets, 1)
    while elapsed < plan.rep_seconds / 4 and calls < (1 << 16):
        calls *= 4
        elapsed = clock.batch(call, sets, calls)
    per_call = max(elapsed / calls, 1e-9)
    calls = max(1, round(plan.rep_seconds / per_call))
    reps = int(min(plan.max_reps, max(plan.min_reps, plan.budget_seconds // (per_call * calls))))
    samples = [clock.batch(call, sets, calls) / calls for _ in range(reps)]
    median = statistics.median(samples)
    spread = statistics.stdev(samples) / median * 100 if len(samples) > 1 and median > 0 else 0.0
    return Timing(median, spread, reps, calls)


def graph_replays(call: Callable, sets: Sequence, device: torch.device) -> tuple[Callable, list, int]:
    """`(replay, [graph], calls)`: one CUDA graph holding `call(s)` for every input set in turn (the rotation
    the eager timing makes), the call that replays it, and the number of calls one replay makes. Time them with
    `measure(replay, [graph], ...)` and divide by `calls`: a replay's own launch cost (a few us) is spread over
    its calls, as it is over the layers of a model's captured step. Raises whatever capture raises (an op
    that synchronises, say)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):  # capture wants the first calls (allocations, autograd) off the capture stream
        for s in sets[:2]:
            call(s)
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for s in sets:
            call(s)
    return (lambda g: g.replay()), [graph], len(sets)
