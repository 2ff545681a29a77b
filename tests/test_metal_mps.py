"""The Metal kernels on a real Apple GPU (`mps`), against the reference path in float64 on the CPU.

The full matrix runs on `mps` and is skipped, with the reason, wherever MPS is unavailable. A few cases
(generic width 19 included, which the op suites do not reach, and shapes spanning several threadgroups)
also run on CPU tensors through the Linux harness (marker `metal`), so CI exercises them. On a Mac:
    pytest -q tests/test_metal_mps.py
The op-level suites also run on MPS with `pytest -q tests --device mps -m metal`.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from causal_conv1d_mps import metal, reference
from causal_conv1d_mps._activation import IDENTITY, SILU
from causal_conv1d_mps.metal import _launch, _loader

_MPS_READY = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
_ON_MPS = pytest.mark.skipif(not _MPS_READY, reason="needs an Apple GPU: torch.backends.mps is not available")
_HARNESS_REASON = metal.unsupported_reason(torch.device("cpu"), torch.float32)
_ON_HARNESS = [pytest.mark.metal, pytest.mark.skipif(_HARNESS_REASON is not None, reason=str(_HARNESS_REASON))]

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WIDTHS = (1, 2, 4, 7, 16, 19)  # 19 takes the generic-width kernels


def _cases(*mps_axes, cpu_cases):
    """Every combination of `mps_axes` on mps, and the listed `cpu_cases` on CPU through the harness."""
    on_mps = [pytest.param("mps", *combo, marks=_ON_MPS) for combo in itertools.product(*mps_axes)]
    on_cpu = [pytest.param("cpu", *case, marks=_ON_HARNESS) for case in cpu_cases]
    return on_mps + on_cpu


def _device_or_skip(device: str, dtype: torch.dtype) -> torch.device:
    dev = torch.device(device)
    reason = metal.unsupported_reason(dev, dtype)
    if reason is not None:
        pytest.skip(reason)
    return dev


def _rand(*shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _check(name, got, ref, dtype):
    got64, ref64 = got.detach().cpu().double(), ref.detach().cpu().double()
    assert got64.shape == ref64.shape, f"{name}: shape {tuple(got64.shape)}, expected {tuple(ref64.shape)}"
    if ref64.numel() == 0:
        return
    scale = ref64.norm().item()
    err = (got64 - ref64).norm().item() / (scale if scale > 0 else 1.0)
    assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e} ({dtype})"


def _to64(*tensors):
    return [None if t is None else t.double() for t in tensors]


def _on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


@pytest.mark.parametrize("device", _cases(cpu_cases=[()]))
def test_every_family_compiles_and_names_every_kernel(device):
    dev = _device_or_skip(device, torch.float32)
    for family in _loader.FAMILIES:
        names = set(dir(_loader.compile_family(dev, family)))
        for dtype in DTYPES:
            if metal.unsupported_reason(dev, dtype) is None:
                missing = [n for n in _loader.family_kernel_names(family, dtype) if n not in names]
                assert not missing, f"family {family}: {missing[:5]} missing from the compiled library"


@pytest.mark.parametrize("device,dtype,width,channel_last", _cases(
    DTYPES, WIDTHS, (False, True),
    cpu_cases=[(torch.float32, 19, False), (torch.bfloat16, 19, True), (torch.float32, 4, False)]))
def test_causal_conv1d_forward_and_backward(device, dtype, width, channel_last):
    _check_causal_conv1d(_device_or_skip(device, dtype), dtype, width, channel_last)


def _check_causal_conv1d(dev, dtype, width, channel_last):
    gen = torch.Generator().manual_seed(width)
    b, d, t = 2, 67, 301
    x = _rand(b, t, d, gen=gen, dtype=dtype).transpose(1, 2) if channel_last else _rand(b, d, t, gen=gen, dtype=dtype)
    weight = _rand(d, width, gen=gen, scale=width**-0.5)  # float32 master weights
    bias = _rand(d, gen=gen)
    init = _rand(b, d, width - 1, gen=gen, dtype=dtype)
    seq_idx = torch.cat([torch.zeros(b, 100, dtype=torch.int32), torch.ones(b, t - 100, dtype=torch.int32)], 1)
    seq_idx[:, -5:] = -1
    dout = _rand(*x.shape, gen=gen, dtype=dtype)
    dfinal = _rand(b, d, width - 1, gen=gen)
    out, final = metal.causal_conv1d_fwd(*_on(dev, x, weight, bias, seq_idx, init), SILU, True)
    ref_out, ref_final = reference.causal_conv1d_fwd(*_to64(x, weight, bias), seq_idx, *_to64(init), SILU, True)
    assert out.stride() == x.to(dev).stride(), "output layout differs from x"
    _check("out", out, ref_out, dtype)
    _check("final_states", final, ref_final, dtype)
    grads = metal.causal_conv1d_bwd(*_on(dev, x, weight, bias, seq_idx, init, dout, dfinal), SILU)
    ref_grads = reference.causal_conv1d_bwd(*_to64(x, weight, bias), seq_idx, *_to64(init, dout, dfinal), SILU)
    for name, got, ref in zip(("dx", "dweight", "dbias", "dinitial_states"), grads, ref_grads):
        _check(name, got, ref, dtype)


@pytest.mark.parametrize("device,dtype,width,varlen", _cases(
    DTYPES, WIDTHS, (False, True),
    cpu_cases=[(torch.float32, 19, True), (torch.half, 19, False), (torch.float32, 4, True)]))
def test_short_conv_fused_forward_and_backward(device, dtype, width, varlen):
    _check_short_conv_fused(_device_or_skip(device, dtype), dtype, width, varlen)


def _check_short_conv_fused(dev, dtype, width, varlen):
    gen = torch.Generator().manual_seed(100 + width)
    b, t, d = (1, 211, 96) if varlen else (3, 130, 96)
    wide = _rand(b, t, 2 * d, gen=gen, dtype=dtype)
    x = wide[:, :, d:]  # a slice of a wider projection: strided over B and T
    weight = _rand(d, width, gen=gen, scale=width**-0.5)
    bias = _rand(d, gen=gen)
    mask = (torch.rand(b, t, generator=gen) > 0.2).float()
    cu = torch.tensor([0, 3, 3, 90, 211], dtype=torch.int32) if varlen else None
    n = 4 if varlen else b
    init = _rand(n, d, width - 1, gen=gen, dtype=dtype)
    dout = _rand(b, t, d, gen=gen, dtype=dtype)
    dfinal = _rand(n, d, width - 1, gen=gen)
    out, final = metal.short_conv_fused_fwd(*_on(dev, x, weight, bias, mask, init, cu), SILU, True, True)
    ref_out, ref_final = reference.short_conv_fused_fwd(*_to64(x, weight, bias, mask, init), cu, SILU, True, True)
    _check("out", out, ref_out, dtype)
    _check("final_states", final, ref_final, dtype)
    grads = metal.short_conv_fused_bwd(*_on(dev, x, weight, bias, mask, init, cu, dout, dfinal), SILU, True)
    ref_grads = reference.short_conv_fused_bwd(*_to64(x, weight, bias, mask, init), cu, *_to64(dout, dfinal),
                                               SILU, True)
    for name, got, ref in zip(("dx", "dweight", "dbias", "dinitial_states"), grads, ref_grads):
        _check(name, got, ref, dtype)


@pytest.mark.parametrize("device", _cases(cpu_cases=[()]))
@pytest.mark.parametrize("width", (4, 19))
def test_backward_with_long_runs(device, width, monkeypatch):
    """Large inputs give the backward runs of up to 64 positions; force them on small shapes."""
    dev = _device_or_skip(device, torch.float32)
    monkeypatch.setattr(_launch, "BACKWARD_MIN_THREADS", 1)
    _check_causal_conv1d(dev, torch.float32, width, False)
    _check_causal_conv1d(dev, torch.float32, width, True)
    _check_short_conv_fused(dev, torch.float32, width, True)


@pytest.mark.parametrize("device,dtype,width,steps,circular", _cases(
    DTYPES, (2, 4, 16, 19), (1, 3, 9), (False, True),
    cpu_cases=[(torch.float32, 19, 9, True), (torch.bfloat16, 19, 3, False)]))
def test_short_conv_update(device, dtype, width, steps, circular):
    dev = _device_or_skip(device, dtype)
    gen = torch.Generator().manual_seed(width * steps)
    b, d, n = 4, 80, 5
    s = width - 1 if steps == 3 else width + 2  # S == W-1 and S > W-1, L > S included
    if s == 0:
        s = 1
    x = _rand(b, d, steps, gen=gen, dtype=dtype).transpose(1, 2)  # Dao layout: a transposed view
    state = _rand(n, s, d, gen=gen, dtype=dtype).transpose(1, 2)  # non-contiguous state, updated in place
    weight = _rand(d, width, gen=gen, scale=width**-0.5)
    bias = _rand(d, gen=gen)
    seqlens = torch.tensor([0, 2, 7, 11], dtype=torch.int32) if circular else None
    indices = torch.tensor([3, -1, 0, 9], dtype=torch.int32)  # padding: negative and >= N
    ref_state = state.double()
    state_dev = state.to(dev, copy=True)
    out = metal.short_conv_update(*_on(dev, x), state_dev, *_on(dev, weight, bias, seqlens, indices), SILU, True)
    ref_out = reference.short_conv_update(*_to64(x), ref_state, *_to64(weight, bias), seqlens,
                                          torch.tensor([3, -1, 0, -1], dtype=torch.int32), SILU, True)
    _check("out", out, ref_out, dtype)
    assert torch.equal(state_dev.cpu(), ref_state.to(dtype)), "conv_state differs from the reference update"


@pytest.mark.parametrize("device,dtype", _cases(DTYPES, cpu_cases=[(torch.bfloat16,)]))
def test_causal_conv1d_varlen_states(device, dtype):
    dev = _device_or_skip(device, dtype)
    gen = torch.Generator().manual_seed(7)
    x = _rand(50, 24, gen=gen, dtype=dtype)
    cu = torch.tensor([0, 2, 2, 30, 50], dtype=torch.int32)
    got = metal.causal_conv1d_varlen_states(x.to(dev), cu.to(dev), 5)
    want = reference.causal_conv1d_varlen_states(x, cu, 5)
    assert torch.equal(got.cpu(), want), "varlen states differ (they are copies of inputs)"


@_ON_MPS
def test_backward_is_bitwise_deterministic():
    gen = torch.Generator().manual_seed(3)
    x, dout = _rand(2, 4096, 64, gen=gen), _rand(2, 4096, 64, gen=gen)
    weight, bias = _rand(64, 4, gen=gen), _rand(64, gen=gen)
    args = _on(torch.device("mps"), x, weight, bias, None, None, None, dout, None)
    first = metal.short_conv_fused_bwd(*args, SILU, True)
    for _ in range(3):
        again = metal.short_conv_fused_bwd(*args, SILU, True)
        for a, b in zip(first[:3], again[:3]):
            assert torch.equal(a.cpu(), b.cpu()), "gradients differ between identical runs"


@pytest.mark.parametrize("device", _cases(cpu_cases=[()]))
def test_empty_inputs_are_bound_as_stand_ins(device):
    """An empty mask (T == 0) or empty states (W == 1) have no buffer (nil on MPS): the launchers bind a
    one-element stand-in (the harness rejects an empty tensor argument)."""
    dev = _device_or_skip(device, torch.float32)
    gen = torch.Generator().manual_seed(11)
    x = _rand(2, 0, 8, gen=gen)
    weight, init, mask = _rand(8, 4, gen=gen), _rand(2, 8, 3, gen=gen), torch.ones(2, 0)
    _, final = metal.short_conv_fused_fwd(*_on(dev, x, weight, None, mask, init, None), SILU, True, True)
    assert torch.equal(final.cpu(), init), "with T == 0 the final states are the initial states"
    x1, w1, init1 = _rand(2, 8, 5, gen=gen), _rand(8, 1, gen=gen), torch.zeros(2, 8, 0)
    out, _ = metal.causal_conv1d_fwd(*_on(dev, x1, w1, None, None, init1), IDENTITY, False)
    ref_out, _ = reference.causal_conv1d_fwd(*_to64(x1, w1), None, None, *_to64(init1), IDENTITY, False)
    _check("out (W == 1, empty initial states)", out, ref_out, torch.float32)
