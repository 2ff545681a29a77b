"""Backend choice (docs/CONTRACT.md section 1): the environment variable is read at call time, and a backend that
cannot run a
call hands it to the reference path on the same device with one warning per reason."""
import warnings

import pytest
import torch

import causal_conv1d_mps as ccmps
from causal_conv1d_mps import _backend, reference
from causal_conv1d_mps._activation import SILU

from conftest import seeded


@pytest.fixture(autouse=True)
def fresh_backend_cache():
    _backend.clear_cache()
    yield
    _backend.clear_cache()


def test_environment_variable_is_read_at_call_time(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.select(cpu, torch.float32) is reference
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    chosen = _backend.select(cpu, torch.float32)
    reason = _backend.backend_unavailable_reason("triton", cpu)
    assert chosen.__name__ == ("causal_conv1d_mps.reference" if reason else "causal_conv1d_mps.triton")
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert _backend.select(cpu, torch.float32) is reference


@pytest.mark.parametrize("name", ["triton", "metal"])
def test_unsupported_call_falls_back_with_one_warning(monkeypatch, name):
    """float64 is for the reference path only: a kernel backend forced on it warns once and still answers."""
    monkeypatch.setenv(_backend.ENV_VAR, name)
    gen = seeded(7)
    x = torch.randn(2, 5, 9, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ccmps.causal_conv1d(x, weight, None, "silu")
        second = ccmps.causal_conv1d(x, weight, None, "silu")
    fallbacks = [w for w in caught if issubclass(w.category, RuntimeWarning) and name in str(w.message)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    assert "reference" in str(fallbacks[0].message)
    expected, _ = reference.causal_conv1d_fwd(x, weight, None, None, None, SILU, False)
    assert torch.equal(first, expected) and torch.equal(second, expected)
