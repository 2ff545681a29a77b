"""The CUDA C++ decode-step prototype (`benchmarks/prototypes/cuda_update.py`) through cuda_harness: its cases
against float64 (outputs) and the contract's shift (states bit for bit), and its check failing on planted bugs."""
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


@pytest.fixture(scope="module")
def update():
    return load_prototype("cuda_update")


def test_cases_match_float64_and_shift_the_state_bit_for_bit(update):
    # a partial block of channel pairs, a strided x, a state longer than W - 1, W = 2 and W = 7
    assert update.check(verbose=False) == 0


@pytest.mark.parametrize("planted", [
    ("entry(s, c * S + S - (W - 1) + k)", "entry(s, c * S + S - W + k)"),       # the taps one entry early
    ("nb[c * S + S - 1] = c ? xw >> 16 : xw & 0xFFFFu;", "nb[c * S + S - 1] = xw & 0xFFFFu;"),  # one token for both
], ids=["tap-offset", "token-into-the-wrong-channel"])
def test_check_fails_on_a_planted_bug(update, monkeypatch, planted):
    right, wrong = planted
    assert right in update.KERNEL
    monkeypatch.setattr(update, "KERNEL", update.KERNEL.replace(right, wrong))
    assert update.check(update.CHECK_CASES[:2], verbose=False) == 1
