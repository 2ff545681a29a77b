"""The compile step: each kernel family compiled (or first called) once, timed, failures reported.

Metal: when the loader offers `FAMILIES` and `compile_family(device, family)`, each family is compiled
on its own (a failure raises an error quoting the compiler's first error line, and only that family's
ops fall back). Otherwise, and for Triton, kernels compile lazily on first use: the first call of each op
(float32, W = 4, tiny shapes) is timed instead. The reference path has nothing to compile.
"""

from __future__ import annotations

import importlib
import time
from typing import Callable

import torch

import causal_conv1d_mps as ccmps

from ..bench.timing import synchronize
from . import serving
from .environment import Target


def _families(families) -> list[tuple[str, object]]:
    """`(name, what compile_family takes)` for `FAMILIES` as a mapping (its keys), or a sequence of names
    or of objects with a `name`."""
    items = list(families.keys()) if hasattr(families, "keys") else list(families)
    return [(item if isinstance(item, str) else str(getattr(item, "name", item)), item) for item in items]


def _metal_families():
    """`(FAMILIES, compile_family)` when the Metal loader compiles per family, else None."""
    loader = importlib.import_module("causal_conv1d_mps.metal._loader")
    families, compile_family = getattr(loader, "FAMILIES", None), getattr(loader, "compile_family", None)
    if families is None or compile_family is None:
        return None
    return families, compile_family


def _timed(what: str, how: str, run: Callable[[], object], target: Target) -> dict:
    """Runs `run` once: `ok` when it succeeded and (for op calls) the requested kernels served it."""
    entry = {"name": what, "how": how, "seconds": None, "ok": False, "error": None, "served_by": None}
    with serving.watch(target.backend) as served:
        start = time.perf_counter()
        try:
            run()
            synchronize(target.device)
            entry["ok"] = True
        except Exception as e:  # a compile error must not stop the check: report it and go on
            entry["error"] = f"{type(e).__name__}: {serving.first_line(e)}"
        entry["seconds"] = time.perf_counter() - start
    entry["warnings"] = served.warnings
    if how == "first call":
        entry["served_by"] = served.served_by
        if served.fell_back and entry["ok"]:
            entry["ok"] = False
            entry["error"] = "fell back to the reference path" + (f": {served.warnings[0]}" if served.warnings else "")
    return entry


def _first_calls(device: torch.device) -> list[tuple[str, Callable[[], object]]]:
    """A tiny float32 call of each op (W = 4), in the order a model meets them."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 16, generator=g).to(device)
    w = torch.randn(8, 4, generator=g).to(device)
    b = torch.randn(8, generator=g).to(device)
    h = x.transpose(1, 2).contiguous()

    def conv_backward():
        xl = x.clone().requires_grad_(True)
        ccmps.causal_conv1d(xl, w, b, "silu").sum().backward()

    def fused_backward():
        hl = h.clone().requires_grad_(True)
        ccmps.short_conv_fused(hl, w, b).sum().backward()

    state = torch.zeros(2, 8, 3, device=device)
    cu = torch.tensor([0, 5, 16], dtype=torch.int32, device=device)
    return [
        ("causal_conv1d forward", lambda: ccmps.causal_conv1d(x, w, b, "silu")),
        ("causal_conv1d backward", conv_backward),
        ("short_conv_fused forward", lambda: ccmps.short_conv_fused(h, w, b)),
        ("short_conv_fused backward", fused_backward),
        ("short_conv_update", lambda: ccmps.short_conv_update(h[:, 0], state, w, b)),
        ("causal_conv1d_varlen_states", lambda: ccmps.causal_conv1d_varlen_states(h[0], cu, 3)),
    ]


def compile_kernels(target: Target) -> list[dict]:
    """One entry per family (or op): `name`, `how`, `seconds`, `ok`, `error` (first line), `served_by`."""
    if target.backend == "reference":
        return []
    if target.unavailable is not None:
        return [{"name": f"{target.backend} kernels", "how": "not compiled", "seconds": None, "ok": False,
                 "error": target.unavailable, "served_by": "reference", "warnings": []}]
    per_family = _metal_families() if target.backend == "metal" else None
    if per_family is not None:
        families, compile_family = per_family
        return [_timed(name, "compile_family", lambda f=family: compile_family(target.device, f), target)
                for name, family in _families(families)]
    return [_timed(name, "first call", run, target) for name, run in _first_calls(target.device)]
