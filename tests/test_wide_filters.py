"""Filters wider than the Triton kernels' `MAX_WIDTH` go to the reference path on the same device (their
unrolled tap loops would compile for minutes); up to it the kernels serve. Both against the float64 oracle."""

from __future__ import annotations

import pytest
import torch

import causal_conv1d_mps as ccmps
import oracle
from conftest import (assert_close_rel, check_silu_conv_with_seq_idx, leaf, leaf64, make_params, oracle_grads, randn,
                      seeded)


@pytest.fixture
def kernel_calls(triton_backend, monkeypatch):
    """The number of Triton kernel launches and CUDA C++ launcher calls made during the test."""
    from causal_conv1d_mps.cuda import launch as cuda_launch
    from causal_conv1d_mps.cuda import launch_update as cuda_update
    from causal_conv1d_mps.triton import launch_conv, launch_update

    calls = []
    for module, name in ((launch_conv, "launch"), (launch_update, "launch"), (cuda_launch, "conv_fwd_bdt"),
                         (cuda_launch, "conv_bwd_bdt"), (cuda_update, "conv_update")):
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


def _unroll_limit():
    from causal_conv1d_mps.triton.kernels.common import UNROLL_MAX_W

    return int(UNROLL_MAX_W)


@pytest.mark.parametrize("past", [False, True], ids=["unrolled", "loop"])
def test_general_tap_loops_with_packed_sequences(triton_backend, past):
    """The masked tiles' taps are unrolled up to `UNROLL_MAX_W` and a run-time loop past it: both sides,
    with every per-tap check those tiles make (sequence ids, padding, initial states), forward and backward."""
    device = triton_backend
    width = _unroll_limit() + int(past)
    gen = seeded(33 + width)
    b, d, t = 2, 6, 29
    x = randn(b, d, t, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    seq_idx = torch.tensor([[0] * 11 + [1] * 14 + [-1] * 4, [2] * 6 + [3] * 23], dtype=torch.int32, device=device)
    check_silu_conv_with_seq_idx(x, weight, bias, seq_idx, gen, f"W{width}")


@pytest.mark.parametrize("past", [False, True], ids=["unrolled", "loop"])
def test_general_tap_loops_with_mask_and_states(triton_backend, past):
    """The same two sides for the fused op: packed sequences with initial states and a gradient on the final
    states, and an attention mask (a masked-out NaN must reach no tap, forward or backward)."""
    device = triton_backend
    width = _unroll_limit() + int(past)
    gen = seeded(43 + width)
    t, d = 31, 5
    cu_seqlens = torch.tensor([0, 4, 19, t], dtype=torch.int32, device=device)
    x = randn(1, t, d, device=device, generator=gen)
    x[0, 7, 2] = float("nan")
    mask = (torch.rand(1, t, generator=gen) > 0.3).to(device)
    mask[0, 7] = False
    weight, bias = make_params(d, width, torch.float32, device, gen)
    states = randn(3, d, width - 1, device=device, generator=gen)
    xg, wg, bg, sg = leaf(x), leaf(weight), leaf(bias), leaf(states)
    # no residual: it would carry the NaN to the output
    out, final = ccmps.short_conv_fused(xg, wg, bg, mask, residual=False, initial_states=sg,
                                        return_final_states=True, cu_seqlens=cu_seqlens)
    dout = randn(*out.shape, device=device, generator=gen)
    dfinal = randn(*final.shape, device=device, generator=gen)
    torch.autograd.backward([out, final], [dout, dfinal])

    x64, w64, b64, s64 = leaf64(x), leaf64(weight), leaf64(bias), leaf64(states)
    ref_out, ref_final = oracle.short_conv_fused(x64, w64, b64, mask.cpu(), residual=False, initial_states=s64,
                                                 cu_seqlens=cu_seqlens.cpu())
    ref_grads = oracle_grads([ref_out, ref_final], [dout, dfinal], [x64, w64, b64, s64])
    assert_close_rel(out, ref_out, torch.float32, "out")
    assert_close_rel(final, ref_final, torch.float32, "final_states")
    for label, got, ref in zip(("dx", "dweight", "dbias", "dinitial_states"), (xg, wg, bg, sg), ref_grads):
        assert_close_rel(got.grad, ref, torch.float32, label)
