"""Which backend really served a call: the requested kernels, or the reference path as a fallback.

A backend that cannot run a call hands it to `causal_conv1d_mps.reference` (the dispatcher does so for
a whole device/dtype, a backend may do so for one op family whose kernels failed to compile), warning
once per reason. Warnings are easy to miss and are issued once per process, so the check also counts
calls into the reference module's backend functions while the package runs: with a kernel backend
requested, any such call, or a warning that names the reference path, is a fallback.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from .. import _backend, reference

# The functions every backend module provides (docs/BACKENDS.md).
BACKEND_FUNCTIONS = ("causal_conv1d_fwd", "causal_conv1d_bwd", "short_conv_fused_fwd", "short_conv_fused_bwd",
                     "short_conv_update", "causal_conv1d_varlen_states")

# How the package words a fallback warning ("... using the PyTorch reference path instead").
FALLBACK_WORDS = "reference path"


@dataclass
class Served:
    """What happened during one watched call."""

    requested: str  # the backend asked for
    reference_calls: list[str] = field(default_factory=list)  # reference functions run (kernel backends only)
    warnings: list[str] = field(default_factory=list)  # warnings the package raised
    by_design: bool = False  # the requested backend hands this call to the reference path on purpose

    @property
    def fell_back(self) -> bool:
        """A kernel backend was asked for, and the reference path ran (or the package said it would) where
        the backend was meant to serve the call."""
        if self.requested == "reference" or self.by_design:
            return False
        return bool(self.reference_calls) or any(FALLBACK_WORDS in w for w in self.warnings)

    @property
    def served_by(self) -> str:
        if self.by_design and self.reference_calls:
            return "reference"
        return "reference" if self.fell_back else self.requested


def reference_by_design(backend: str, width: int | None) -> bool:
    """Whether `backend` hands a filter of `width` taps to the reference path on purpose: the Triton backend
    does above its `MAX_WIDTH` (its kernels' compile time grows with the width; docs/TRITON.md)."""
    if backend != "triton" or width is None:
        return False
    from .. import triton as triton_backend  # does not import triton itself

    return not triton_backend.serves_width(width)


def _counting(name: str, fn, calls: list[str]):
    @functools.wraps(fn)
    def counted(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return counted


@contextmanager
def watch(requested: str, width: int | None = None) -> Iterator[Served]:
    """Records fallbacks and warnings of the package calls made inside the block (of filters of `width`
    taps, where known: a width the backend hands to the reference path by design is no fallback).

    The dispatcher's cache is cleared first so that a fallback warns again for this call.
    """
    served = Served(requested, by_design=reference_by_design(requested, width))
    originals = {}
    if requested != "reference":
        originals = {name: getattr(reference, name) for name in BACKEND_FUNCTIONS}
        for name, fn in originals.items():
            setattr(reference, name, _counting(name, fn, served.reference_calls))
    _backend.clear_cache()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield served
            finally:
                served.warnings = list(dict.fromkeys(first_line(w.message) for w in caught))
    finally:
        for name, fn in originals.items():
            setattr(reference, name, fn)


def first_line(message) -> str:
    """The first line of a warning or error message (compiler errors run to many lines), at most 300 chars."""
    text = str(message).strip()
    return (text.splitlines()[0] if text else "")[:300]
