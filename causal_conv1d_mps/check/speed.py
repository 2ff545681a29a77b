"""Timing against eager PyTorch: a few shapes, each verified then timed by the benchmark package.

Rows: forward `causal_conv1d` (SiLU), fused `short_conv_fused` (mask, bias, SiLU, residual), fused
forward + backward, and one decode step. `eager` is the PyTorch a user would write (`F.conv1d(groups=D)`
with padding, masking, transposes and residual; a roll-and-einsum decode step): see docs/BENCHMARK.md.
"""

from __future__ import annotations

from dataclasses import replace

import torch

import causal_conv1d_mps as ccmps

from ..bench import timing
from ..bench.cases import build_case
from ..bench.runner import run_case
from ..bench.suites import Spec, shrink
from . import serving
from .environment import Target, dtype_name

# Shorter than the benchmark's plan: a few shapes, about a quarter of a second per implementation.
PLAN = timing.Plan(warmup=3, rep_seconds=2e-3, min_reps=5, max_reps=30, budget_seconds=0.25)
# Kernels emulated on the CPU (Triton's interpreter, the Metal harness) take up to seconds per call: one
# timed call per implementation, on tiny shapes, shows that the path works; the figure means nothing.
EMULATED_PLAN = timing.Plan(warmup=1, rep_seconds=0.0, min_reps=1, max_reps=1, budget_seconds=0.0)
MIB = 1 << 20
GPU_ROTATE_BYTES = 256 * MIB  # calls rotate over inputs larger than the L2/SLC of big GPUs
SMALL_ROTATE_BYTES = 1 * MIB

_GPU_SPECS = (
    Spec("check", "causal_conv1d", "forward SiLU", 4, 2048, 4096),
    Spec("check", "short_conv_fused", "fused mask+bias+SiLU+residual", 4, 2048, 4096, mask=True),
    Spec("check", "short_conv_fused", "fused forward+backward", 4, 2048, 2048, backward=True),
    Spec("check", "short_conv_update", "decode step", 8, 4096),
)
# CPU runs the reference path (or an interpreter): the figures are a smoke test, not a performance claim.
_CPU_SPECS = (
    Spec("check", "causal_conv1d", "forward SiLU", 2, 256, 512),
    Spec("check", "short_conv_fused", "fused mask+bias+SiLU+residual", 2, 256, 512, mask=True),
    Spec("check", "short_conv_fused", "fused forward+backward", 2, 256, 256, backward=True),
    Spec("check", "short_conv_update", "decode step", 8, 1024),
)


def emulated(target: Target) -> bool:
    """Kernels of a GPU backend running on the CPU (tests and CI)."""
    return target.device.type == "cpu" and target.backend != "reference" and target.unavailable is None


def specs(target: Target, quick: bool) -> list[Spec]:
    if emulated(target):
        return [replace(s, B=1, D=16, T=min(s.T, 32)) for s in _CPU_SPECS]
    base = _CPU_SPECS if target.device.type == "cpu" else _GPU_SPECS
    return [shrink(s) for s in base] if quick else list(base)


def time_all(target: Target, dtype: torch.dtype, quick: bool, progress=None) -> list[dict]:
    """One record per shape: `ours_ms`, `eager_ms`, `speedup` (eager / ours), verdict, who served it."""
    small = quick or target.device.type == "cpu"
    plan = EMULATED_PLAN if emulated(target) else timing.QUICK if quick else PLAN
    rotate = SMALL_ROTATE_BYTES if small else GPU_ROTATE_BYTES
    records = []
    for spec in specs(target, quick):
        if progress is not None:
            progress(f"timing {spec.name}")
        with serving.watch(target.backend, spec.width) as served:
            try:
                row = run_case(build_case(spec, dtype, target.device, ccmps, []), plan, rotate, 0.0, False)
                error = None
            except Exception as e:  # a row that cannot run (memory, say) is reported, not fatal
                row, error = {}, f"{type(e).__name__}: {serving.first_line(e)}"
        records.append({
            "name": spec.name, "op": spec.op, "label": spec.label, "shape": {"B": spec.B, "D": spec.D, "T": spec.T},
            "width": spec.width, "dtype": dtype_name(dtype), "backward": spec.backward,
            "ours_ms": row.get("ours_ms"), "eager_ms": row.get("eager_ms"), "speedup": row.get("speedup"),
            "rel_err": row.get("rel_err"), "correct": bool(row.get("correct")) and error is None,
            "served_by": served.served_by, "fallback": served.fell_back,
            "notes": ([error] if error else []) + row.get("notes", []),
        })
    return records
