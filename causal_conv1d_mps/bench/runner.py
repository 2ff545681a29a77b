"""Runs one row: builds the input sets, verifies each implementation, then times it."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable

import torch

from . import accuracy, timing
from .cases import Case, Inputs

MAX_INPUT_SETS = 64


def input_sets(case: Case, rotate_bytes: int) -> list[Inputs]:
    """Enough input sets that one pass over them moves `rotate_bytes` (more than any L2/SLC)."""
    count = min(MAX_INPUT_SETS, max(1, math.ceil(rotate_bytes / max(case.bytes, 1))))
    return [case.make_inputs() for _ in range(count)]


def _snapshot(s: Inputs) -> Inputs:
    return {k: (None if v is None else v.detach().clone()) for k, v in s.items()}


def implementations(case: Case, compile_eager: bool) -> list[tuple[str, Callable | None, str | None]]:
    """`(name, forward fn or None, why not)` for ours, eager, compiled eager and third parties."""
    impls: list[tuple[str, Callable | None, str | None]] = [("ours", case.ours, None), ("eager", case.eager, None)]
    if compile_eager:
        try:
            torch._dynamo.reset()  # a fresh cache per row: no recompile limit, no stale graphs
            impls.append(("compile", torch.compile(case.eager), None))
        except Exception as e:  # torch.compile unsupported here (platform, Python version)
            impls.append(("compile", None, f"torch.compile unavailable: {e}"))
    impls.extend((name, fn, None) for name, fn in case.thirdparty.items())
    return impls


def _run_impl(case: Case, name: str, fn: Callable, sets: list[Inputs], plan: timing.Plan,
              cuda_graphs: bool = False) -> dict:
    call = case.wrap(fn)
    before = _snapshot(sets[0]) if case.mutates_inputs else sets[0]
    result: dict = {"ms": None, "stdev_pct": None, "gbps": None, "rel_err": None, "ok": None, "notes": []}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = call(sets[0])
        result["notes"] += [f"{name}: warning: {w.message}" for w in caught]
        verdict = accuracy.check(case, before, results)
        del results
    except Exception as e:  # any failure of one implementation is reported in its row, not fatal
        result["ok"] = False
        result["notes"].append(_error_note(f"{name}: error", e))
        return result
    result["rel_err"], result["ok"] = verdict.rel_err, verdict.ok
    if not verdict.ok:
        exact = "" if verdict.exact_ok else ", state not bit-exact"
        found = f"{verdict.worst} rel err {verdict.rel_err:.2e} > {verdict.tolerance:.0e}{exact}"
        result["notes"].append(f"{name}: wrong result ({found})")
        if name not in ("ours", "eager"):  # a wrong third-party result is not a speed worth reporting
            return result
    try:  # a graph replay makes one call per input set
        timed, timed_sets, calls_per_item = timing.graph_replays(call, sets, case.device) if cuda_graphs else (
            call, sets, 1)
    except Exception as e:  # an implementation that cannot be captured: the row keeps its verdict
        result["notes"].append(_error_note(f"{name}: CUDA graph capture failed", e))
        return result
    try:
        t = timing.measure(timed, timed_sets, case.device, plan)
    except Exception as e:  # out of memory on a small device, for example: the row keeps its verdict
        result["notes"].append(_error_note(f"{name}: error while timing", e))
        return result
    finally:
        del timed, timed_sets  # a graph holds its outputs' memory
    seconds = t.seconds / calls_per_item
    result.update(ms=seconds * 1e3, stdev_pct=t.stdev_pct, reps=t.reps,
                  calls_per_rep=t.calls_per_rep * calls_per_item, gbps=case.bytes / seconds / 1e9)
    return result


def _error_note(what: str, e: Exception) -> str:
    return f"{what}: {type(e).__name__}: {e}".splitlines()[0][:200]


def _ratio(numerator, denominator):
    return numerator / denominator if numerator and denominator else None


def run_case(case: Case, plan: timing.Plan, rotate_bytes: int, copy_gbps: float, compile_eager: bool,
             cuda_graphs: bool = False) -> dict:
    """One JSON record: shape and flags, per-implementation results, and the headline columns; with
    `cuda_graphs` every implementation is timed by replaying CUDA graphs of its calls."""
    try:
        sets = input_sets(case, rotate_bytes)
    except Exception as e:  # too large for this device: the row is reported as not run (and not verified)
        not_run = {"ms": None, "ok": False}
        return _record(case, {"ours": dict(not_run), "eager": dict(not_run)},
                       [_error_note("inputs could not be allocated", e)], copy_gbps)
    impls: dict[str, dict] = {}
    notes: list[str] = []
    for name, fn, why_not in implementations(case, compile_eager):
        if fn is None:
            impls[name] = {"ms": None, "ok": None, "notes": [why_not]}
        else:
            impls[name] = _run_impl(case, name, fn, sets, plan, cuda_graphs)
        notes += impls[name].pop("notes")
    del sets
    return _record(case, impls, notes, copy_gbps)


def _record(case: Case, impls: dict[str, dict], notes: list[str], copy_gbps: float) -> dict:
    spec = case.spec
    ours, eager, compiled = impls["ours"], impls["eager"], impls.get("compile", {})
    return {
        "suite": spec.suite,
        "name": spec.name,
        "op": spec.op,
        "shape": {"B": spec.B, "D": spec.D, "T": spec.T},
        "width": spec.width,
        "dtype": str(case.dtype).removeprefix("torch."),
        "flags": {k: v for k, v in dataclasses.asdict(spec).items() if k in
                  ("silu", "bias", "residual", "mask", "backward", "channel_last", "row_stride")},
        "bytes": case.bytes,
        "ours_ms": ours["ms"],
        "ours_stdev_pct": ours.get("stdev_pct"),
        "eager_ms": eager["ms"],
        "eager_stdev_pct": eager.get("stdev_pct"),
        "compile_ms": compiled.get("ms"),
        "speedup": _ratio(eager["ms"], ours["ms"]),
        "speedup_vs_compile": _ratio(compiled.get("ms"), ours["ms"]),
        "gbps": ours.get("gbps"),
        "pct_copy": 100 * ours["gbps"] / copy_gbps if ours.get("gbps") and copy_gbps else None,
        "rel_err": ours.get("rel_err"),
        "tolerance": accuracy.TOLERANCE[case.dtype],
        "correct": bool(ours.get("ok")),
        "impls": impls,
        "notes": notes,
    }
