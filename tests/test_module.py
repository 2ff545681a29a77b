"""`ShortConvolution` (docs/CONTRACT.md section 3.10): init, forward, cache semantics, prefill + decode, varlen."""

from __future__ import annotations

import math

import pytest
import torch

import causal_conv1d_mps as ccmps
import oracle
from conftest import assert_close_rel, leaf64, oracle_grads, randn, seeded


def _module(d, width, bias=True, activation="silu", residual=False, device="cpu", seed=0):
    torch.manual_seed(seed)
    return ccmps.ShortConvolution(d, width, bias=bias, activation=activation, residual=residual, device=device)


@pytest.mark.parametrize("width", [1, 4, 16])
def test_parameters_initialised_like_depthwise_conv1d(width):
    """Shapes `[D, W]`, `[D]`; U(-1/sqrt(W), 1/sqrt(W)) as nn.Conv1d(D, D, W, groups=D) (bound and spread)."""
    d = 4096
    module = _module(d, width, bias=True)
    reference = torch.nn.Conv1d(d, d, width, groups=d)
    assert module.weight.shape == (d, width) and module.bias.shape == (d,)
    bound = 1.0 / math.sqrt(width)
    for name, got, ref in (("weight", module.weight, reference.weight), ("bias", module.bias, reference.bias)):
        assert got.abs().max() <= bound, f"{name}: |value| {got.abs().max():.4f} above the bound {bound:.4f}"
        # Fixed seed, 4096+ samples: the spreads of two uniform draws agree within a few percent.
        ratio = (got.std() / ref.std()).item()
        assert 0.9 < ratio < 1.1, f"{name}: std ratio to nn.Conv1d's init {ratio:.3f}"


def test_no_bias_and_dtype_device_arguments(device):
    module = ccmps.ShortConvolution(8, 3, bias=False, device=device, dtype=torch.bfloat16)
    assert module.bias is None
    assert module.weight.dtype == torch.bfloat16 and module.weight.device.type == device.type
    assert [name for name, _ in module.named_parameters()] == ["weight"]


@pytest.mark.parametrize("activation,residual", [("silu", False), (None, False), ("silu", True)])
def test_forward_matches_oracle_with_gradients(backend, device, activation, residual):
    gen = seeded(50)
    b, t, d, width = 2, 17, 5, 4
    module = _module(d, width, activation=activation, residual=residual, device=device)
    x = randn(b, t, d, device=device, generator=gen).requires_grad_(True)
    mask = (torch.rand(b, t, generator=gen) > 0.3).to(device)
    y, cache = module(x, attention_mask=mask)
    assert cache is None, "no cache given and output_final_state False: no new cache"
    dy = randn(b, t, d, device=device, generator=gen)
    y.backward(dy)

    x64, w64, b64 = leaf64(x), leaf64(module.weight), leaf64(module.bias)
    ref, _ = oracle.short_conv_fused(x64, w64, b64, mask.cpu(), activation == "silu", residual)
    ref_grads = oracle_grads([ref], [dy], [x64, w64, b64])
    assert_close_rel(y, ref, torch.float32, "y")
    for label, got, want in zip(("dx", "dweight", "dbias"), (x, module.weight, module.bias), ref_grads):
        assert_close_rel(got.grad, want, torch.float32, label)


def test_cache_returned_when_asked_or_given(backend, device):
    gen = seeded(51)
    module = _module(5, 4, device=device)
    x = randn(2, 9, 5, device=device, generator=gen)
    _, cache = module(x, output_final_state=True)
    assert cache.shape == (2, 5, 3)
    _, ref_final = oracle.short_conv_fused(x.cpu(), module.weight.detach().cpu(), module.bias.detach().cpu())
    assert_close_rel(cache, ref_final, torch.float32, "cache")
    _, new_cache = module(x, cache=cache)
    assert new_cache is not None and new_cache.shape == (2, 5, 3), "a given cache returns the new cache"


@pytest.mark.parametrize("step_len", [1, 3])
@pytest.mark.parametrize("residual", [False, True])
def test_prefill_then_step_decode_equals_full_forward(backend, device, residual, step_len):
    gen = seeded(52)
    b, t, d, width, prefill = 2, 16, 7, 4, 5
    module = _module(d, width, residual=residual, device=device)
    x = randn(b, t, d, device=device, generator=gen)
    with torch.no_grad():
        full, _ = module(x)
        head, cache = module(x[:, :prefill], output_final_state=True)
        outs = [head]
        for start in range(prefill, t, step_len):
            chunk = x[:, start : start + step_len]
            token = chunk[:, 0] if step_len == 1 else chunk  # (B, D) for one token, (B, L, D) for several
            y, same_cache = module.step(token, cache)
            assert same_cache is cache, "step updates the given cache in place and returns it"
            outs.append(y[:, None] if step_len == 1 else y)
    assert_close_rel(torch.cat(outs, dim=1), full.to(torch.float64), torch.float32, "decoded")


def test_cu_seqlens_caches_per_sequence(backend, device):
    gen = seeded(53)
    d, width = 5, 3
    bounds = [0, 4, 4, 13]
    module = _module(d, width, device=device)
    x = randn(1, bounds[-1], d, device=device, generator=gen)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    initial = randn(3, d, width - 1, device=device, generator=gen)
    with torch.no_grad():
        y, cache = module(x, cache=initial.clone(), cu_seqlens=cu)
    ref, ref_final = oracle.short_conv_fused(x.cpu(), module.weight.detach().cpu(), module.bias.detach().cpu(),
                                             None, True, False, initial_states=initial.cpu(), cu_seqlens=cu.cpu())
    assert cache.shape == (3, d, width - 1)
    assert_close_rel(y, ref, torch.float32, "y")
    assert_close_rel(cache, ref_final, torch.float32, "cache")


@pytest.mark.parametrize("call", ["forward_shape", "forward_dtype", "step_shape", "step_leaf"])
def test_cache_errors_name_cache(call):
    """Errors about the cache name `cache`, the argument the caller passed (not initial_states/conv_state)."""
    module = ccmps.ShortConvolution(4, 3, bias=True)
    x = torch.randn(2, 5, 4)
    with pytest.raises((ValueError, TypeError)) as info:
        if call == "forward_shape":
            module(x, cache=torch.zeros(2, 4, 5))
        elif call == "forward_dtype":
            module(x, cache=torch.zeros(2, 4, 2, dtype=torch.int32))
        elif call == "step_shape":
            module.step(x[:, 0], torch.zeros(2, 3, 2))
        else:
            module.step(x[:, 0], torch.zeros(2, 4, 2, requires_grad=True))
    message = str(info.value)
    assert message.startswith("cache:"), message
