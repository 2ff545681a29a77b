"""The wide-filter channel-last prototype (`benchmarks/prototypes/cuda_btd_wide.py`) through cuda_harness:
two of its variants against float64 at awkward sizes, and its check failing on a planted masking bug."""
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

SHAPES = ((2, 13, 64), (1, 3, 40), (1, 70, 260))  # T % run != 0; T < W; B = 1 with a partial block of channels


@pytest.fixture(scope="module")
def wide():
    return load_prototype("cuda_btd_wide")


@pytest.mark.parametrize("name", ["lazy-v4r8-m2", "lazy-v4r8-m3-dc-in"])
def test_warp_vote_mask_variants_match_float64(wide, name):
    # shuffled mask values, the vote, the fast (binary / all-ones) and the general paths, soft masks included,
    # NaN and Inf at masked positions; the second with D compiled in and runs inside [0, T) without checks
    assert wide.check([name], widths=(7,), shapes=SHAPES, verbose=False) == 0


def test_streaming_two_channel_variant_matches_float64(wide):
    # 2 channels per thread, 32 steps, 16 rows of loads ahead, weights in shared memory, at the widest filter
    assert wide.check(["smem-v2r32a16"], widths=(16,), shapes=SHAPES, masks=(True,), verbose=False) == 0


def test_check_fails_when_a_masked_nan_is_multiplied_instead_of_selected(wide, monkeypatch):
    selected = "m != 0.f ? (PATH == WV_BINARY ? g[j] : g[j] * m) : 0.f;"
    assert selected in wide.KERNEL
    monkeypatch.setattr(wide, "KERNEL", wide.KERNEL.replace(selected, "g[j] * m;"))
    assert wide.check(["lazy-v4r8-m3"], widths=(4,), shapes=SHAPES[:1], verbose=False) == 1
