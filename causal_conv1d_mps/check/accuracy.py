"""Runs the accuracy checks of `cases` and grades them at the contract's tolerances.

Relative error `||out - ref|| / ||ref||` in float64 for every output and gradient (absolute where the
reference is all zero): fp32 1e-5, fp16 2e-3, bf16 1e-2. Decode states and varlen states are copies of
inputs and must match bit for bit. Each trial also records which backend served it (see `serving`).
"""

from __future__ import annotations

import math

import torch

from ..bench.accuracy import TOLERANCE
from ..bench.timing import synchronize
from . import serving
from .cases import CASES, WIDE, WIDTHS, Case, Draw, Outputs
from .environment import Target, dtype_name


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """`||got - ref|| / ||ref||` in float64 (absolute when `ref` is all zero); NaN or Inf give inf."""
    got64, ref64 = got.detach().cpu().to(torch.float64), ref.detach().cpu().to(torch.float64)
    diff = torch.linalg.vector_norm(got64 - ref64).item()
    scale = torch.linalg.vector_norm(ref64).item()
    err = diff / scale if scale > 0 else diff
    return err if math.isfinite(err) else math.inf


def _bit_exact(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.equal(got.detach().cpu().to(torch.float64), ref.to(torch.float64))


def grade(got: Outputs, expected: Outputs, exact: tuple[str, ...], tolerance: float) -> dict[str, dict]:
    """Per output: `rel_err`, `ok`, and `exact` (whether it had to match bit for bit)."""
    if set(got) != set(expected):
        raise ValueError(f"outputs {sorted(got)}, expected {sorted(expected)}")
    grades = {}
    for name, ref in expected.items():
        out = got[name]
        if tuple(out.shape) != tuple(ref.shape):
            raise ValueError(f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
        err = rel_error(out, ref) if ref.numel() else 0.0
        must_match = name in exact
        ok = _bit_exact(out, ref) if must_match else err <= tolerance
        grades[name] = {"rel_err": err, "ok": ok, "exact": must_match}
    return grades


def trials(quick: bool, dtypes: list[torch.dtype]) -> list[tuple[Case, torch.dtype, int]]:
    """Every case at every dtype and width. `quick`: one width per (case, dtype), rotating through the
    narrow ones; a case marked `wide` takes W = 33 at one dtype (the dtype rotating from case to case)."""
    narrow = [w for w in WIDTHS if w != WIDE]
    plan = []
    for i, case in enumerate(CASES):
        for j, dtype in enumerate(dtypes):
            if not quick:
                plan.extend((case, dtype, width) for width in WIDTHS)
            elif case.wide and j == i % len(dtypes):
                plan.append((case, dtype, WIDE))
            else:
                plan.append((case, dtype, narrow[(i + j) % len(narrow)]))
    return plan


def run_trial(case: Case, dtype: torch.dtype, width: int, target: Target, seed: int) -> dict:
    """One JSON record: what ran, each output's error, the verdict, who served the call, any error."""
    tolerance = TOLERANCE[dtype]
    record = {"op": case.op, "case": case.label, "dtype": dtype_name(dtype), "width": width, "shape": None,
              "tolerance": tolerance, "ok": False, "rel_err": None, "worst": None, "outputs": {}, "error": None,
              "served_by": None, "fallback": False, "warnings": []}
    draw = Draw(dtype, target.device, seed)
    trial = case.build(draw, width)
    record["shape"] = trial.shape
    got = None
    with serving.watch(target.backend, width) as served:
        try:
            got = trial.run()
            synchronize(target.device)
        except Exception as e:  # a failing call is a failed check, reported in its row; the others still run
            record["error"] = f"{type(e).__name__}: {serving.first_line(e)}"
    record.update(served_by=served.served_by, fallback=served.fell_back, warnings=served.warnings)
    if got is None:
        return record
    try:
        grades = grade(got, trial.expect(), trial.exact, tolerance)
    except Exception as e:  # wrong shapes or names: as wrong as a wrong value
        record["error"] = f"{type(e).__name__}: {serving.first_line(e)}"
        return record
    worst = max(grades, key=lambda k: grades[k]["rel_err"])
    record.update(outputs=grades, worst=worst, rel_err=grades[worst]["rel_err"],
                  ok=all(g["ok"] for g in grades.values()))
    return record


def run_all(target: Target, dtypes: list[torch.dtype], quick: bool, seed: int, progress=None) -> list[dict]:
    records = []
    for n, (case, dtype, width) in enumerate(trials(quick, dtypes)):
        if progress is not None:
            progress(f"{case.op} {dtype_name(dtype)} W{width}")
        records.append(run_trial(case, dtype, width, target, seed + n))
    return records
