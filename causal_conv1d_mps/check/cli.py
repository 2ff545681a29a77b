"""Command line: `python -m causal_conv1d_mps.check [options]` (see docs/CHECK.md)."""

from __future__ import annotations

import argparse
import sys

import torch

from .. import _backend
from ..bench import devices
from ..bench.progress import Progress
from . import accuracy, kernels, report, speed
from .cases import WIDTHS
from .environment import DTYPES, backend_forced, choose_target, dtype_support, environment

TIMING_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # on GPUs, the first the kernels serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m causal_conv1d_mps.check",
        description="Check causal-conv1d-mps on this machine: compile the kernels, compare every op and dtype "
        "with a float64 reference, confirm the kernels (not a fallback) ran, and time a few shapes against "
        "eager PyTorch. Exit status 0 when every check passed, 1 when a result was wrong, 2 on a usage error.",
    )
    p.add_argument("--device", type=devices.device_argument, default="auto", help="auto (mps > cuda > cpu), cpu, cuda[:N] or mps")
    p.add_argument("--backend", choices=_backend.BACKENDS, default=None,
                   help="force a backend (default: the device's: metal on mps, triton on cuda, reference on cpu); "
                   "on cpu, triton runs the Triton interpreter and metal the Linux harness of a source checkout")
    p.add_argument("--quick", action="store_true",
                   help=f"one width per case and dtype instead of all of {', '.join(map(str, WIDTHS))}, and tiny "
                   "timing shapes (what CI runs)")
    p.add_argument("--no-timing", action="store_true", help="skip the timing against eager PyTorch")
    p.add_argument("--json", metavar="PATH", help="write the environment and every result to PATH as JSON")
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    return p


def _timing_dtype(device: torch.device, support: dict) -> torch.dtype:
    """float32 on CPU (the reference path); on GPUs the narrowest dtype the kernels serve."""
    if device.type == "cpu":
        return torch.float32
    for dtype in TIMING_DTYPES:
        if support[dtype]["checked"] and support[dtype]["served_by"] != "reference":
            return dtype
    return torch.float32


class _Bar:
    """Progress on stderr (a terminal only): called with the label of each item as it starts."""

    def __init__(self, total: int):
        self.bar, self.started = Progress(total), False

    def __call__(self, label: str) -> None:
        if self.started:
            self.bar.advance()
        self.started = True
        self.bar.step(label)

    def close(self) -> None:
        self.bar.close()


def main(argv: list[str] | None = None) -> int:
    """Runs the check; 0 when every check passed, 1 when a result was wrong, 2 on bad usage."""
    args = build_parser().parse_args(argv)
    try:
        device = devices.pick_device(args.device)
        target = choose_target(device, args.backend)  # a bad CAUSAL_CONV1D_BACKEND raises here
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = sys.stdout
    support = dtype_support(target)
    env = environment(target, support, quick=args.quick, seed=args.seed, timing=not args.no_timing)
    with backend_forced(target.backend):
        out.write(report.environment_text(env) + "\n")
        out.flush()
        compiled = kernels.compile_kernels(target)
        out.write(report.compile_text(compiled, env) + "\n")
        out.flush()
        dtypes = [d for d in DTYPES if support[d]["checked"]]
        plan = accuracy.trials(args.quick, dtypes)
        timed = [] if args.no_timing else speed.specs(target, args.quick)
        progress = _Bar(len(plan) + len(timed))
        try:
            results = accuracy.run_all(target, dtypes, args.quick, args.seed, progress=progress)
            timings = None
            if not args.no_timing:
                timings = speed.time_all(target, _timing_dtype(device, support), args.quick, progress=progress)
        finally:
            progress.close()
    summary = report.summarize(results, compiled, timings or [])
    out.write(report.results_text(env, results, timings, summary))
    if args.json:
        try:
            report.write_json(args.json, env, compiled, results, timings, summary)
        except OSError as e:
            print(f"error: --json {args.json}: {e}", file=sys.stderr)
            return 2
        out.write(f"wrote {args.json}\n")
    return summary["exit_status"]
