"""The (B,D,T) forward prototype `benchmarks/prototypes/cuda_bdt_fwd.py` through cuda_harness: its two halo
schemes (a contiguous run per thread, warp-interleaved vectors) and its lean path match the float64
reference at awkward sizes, and its check catches a planted bug (the edge lanes' halo dropped), so a pass
means something."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("cuda_harness") is None:  # test-only package at the repository root
    sys.path.insert(0, str(ROOT))

import cuda_harness  # noqa: E402
from conftest import load_prototype  # noqa: E402

pytestmark = pytest.mark.skipif(cuda_harness.unavailable_reason() is not None,
                                reason=str(cuda_harness.unavailable_reason()))

cuda_bdt_fwd = load_prototype("cuda_bdt_fwd")

# W = 12: two halo vectors; the shapes include a row that spans several warps (T = 2128). The lean variant
# takes the other code path (immediate tap offsets, unpredicated loads in full blocks).
VARIANTS = tuple(cuda_bdt_fwd.BY_NAME[n] for n in ("c4t128", "s4t128", "c4t128-lean-tanh"))


def test_variants_match_the_float64_reference():
    assert cuda_bdt_fwd.check(VARIANTS, widths=(12,), verbose=False) == 0


def test_check_fails_on_a_planted_bug():
    wide = tuple(s for s in cuda_bdt_fwd.CHECK_SHAPES if s[2] > 8 * 32 * 4)
    assert cuda_bdt_fwd.check(VARIANTS, widths=(12,), shapes=wide, bug=True, verbose=False) >= len(VARIANTS)
