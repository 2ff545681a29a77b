"""Filters wider than the Triton kernels' `MAX_WIDTH` go to the reference path on the same device (their
unrolled tap loops would compile for minutes); up to it the kernels serve. Both against the float64 oracle."""

from __future__ import annotations

import pytest
import torch

import causal_conv1d_mps as ccmps
import oracle
from conftest import assert_close_rel, leaf, leaf64, make_params, oracle_grads, randn, seeded


@pytest.fixture
def kernel_calls(triton_backend, monkeypatch):
    """The number of Triton kernel launches and CUDA C++ launcher calls made during the test."""
    from causal_conv1d_mps.cuda import launch as cuda_launch
    from causal_conv1d_mps.triton import launch_conv, launch_update

    calls = []
    for module, name in ((launch_conv, "launch"), (launch_update, "launch"), (cuda_launch, "conv_fwd_bdt"),
                         (cuda_launch, "conv_bwd_bdt")):
        real = getattr(module, name)

        def counting(*args, _real=real, **kwargs):
            calls.append(1)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
    return calls


def _max_width():
    from causal_conv1d_mps import triton as triton_backend

    return triton_backend.MAX_WIDTH


@pytest.mark.parametrize("wider", [False, True], ids=["at-limit", "past-limit"])
def test_causal_conv1d_width_limit(triton_backend, kernel_calls, wider):
    device = triton_backend
    width = _max_width() + int(wider)
    gen = seeded(31)
    x = randn(2, 3, 40, device=device, generator=gen)
    weight, bias = make_params(3, width, torch.float32, device, gen)
    states = randn(2, 3, width - 1, device=device, generator=gen)
    xg, wg, bg, sg = leaf(x), leaf(weight), leaf(bias), leaf(states)
    out, final = ccmps.causal_conv1d(xg, wg, bg, "silu", initial_states=sg, return_final_states=True)
    dout = randn(*out.shape, device=device, generator=gen)
    out.backward(dout)

    x64, w64, b64, s64 = leaf64(x), leaf64(weight), leaf64(bias), leaf64(states)
    ref_out, ref_final = oracle.causal_conv1d(x64, w64, b64, "silu", initial_states=s64)
    ref_grads = oracle_grads([ref_out], [dout], [x64, w64, b64, s64])
    assert_close_rel(out, ref_out, torch.float32, "out")
    assert_close_rel(final, ref_final, torch.float32, "final_states")
    for label, got, ref in zip(("dx", "dweight", "dbias", "dinitial_states"), (xg, wg, bg, sg), ref_grads):
        assert_close_rel(got.grad, ref, torch.float32, label)
    assert (len(kernel_calls) == 0) == wider, f"W = {width}: {len(kernel_calls)} kernel launches"


@pytest.mark.parametrize("wider", [False, True], ids=["at-limit", "past-limit"])
def test_fused_and_decode_width_limit(triton_backend, kernel_calls, wider):
    device = triton_backend
    width = _max_width() + int(wider)
    gen = seeded(32)
    x = randn(2, 37, 5, device=device, generator=gen)
    weight, bias = make_params(5, width, torch.float32, device, gen)
    mask = (torch.arange(37, device=device) >= 3).expand(2, 37)
    out = ccmps.short_conv_fused(x, weight, bias, mask)
    ref, _ = oracle.short_conv_fused(x.cpu(), weight.cpu(), bias.cpu(), mask.cpu())
    assert_close_rel(out, ref, torch.float32, "fused out")

    state = randn(2, 5, width - 1, device=device, generator=gen)
    token = randn(2, 5, device=device, generator=gen)
    ref_step, ref_state = oracle.short_conv_update(token.cpu(), state.cpu(), weight.cpu(), bias.cpu(), residual=False)
    step = ccmps.short_conv_update(token, state, weight, bias, residual=False)
    assert_close_rel(step, ref_step, torch.float32, "decode out")
    assert_close_rel(state, ref_state, torch.float32, "decode state")
    assert (len(kernel_calls) == 0) == wider, f"W = {width}: {len(kernel_calls)} kernel launches"
