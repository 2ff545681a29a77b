"""The functions transformers' layers call once `integrations.transformers.enable()` is on.

`causal_conv1d_mps.integrations.transformers.causal_conv1d_fn` / `causal_conv1d_update` replace
transformers' functions of the same names: every call form of transformers 5.15-5.24, activation strings,
packed sequences (`seq_idx`, `cu_seqlens`, which transformers' own fallback refuses), the caches' state
layouts, strided views out of `in_proj` splits and float32 weights with half-precision activations.
Outputs are compared with the float64 oracle at the contract's tolerances, states bitwise, and, where
transformers is installed, with transformers' own PyTorch functions. These run on the reference path
and on the Triton kernels (under the interpreter on CPU).
"""
from __future__ import annotations

import pytest
import torch

import causal_conv1d_mps as ccmps
import oracle
from causal_conv1d_mps.integrations import transformers as cc_hf
from conftest import (assert_close_rel, assert_equal_exact, leaf, leaf64, make_params, oracle_grads, randn, seeded,
                      skip_without_lfm3)

HF_BACKENDS = ("reference", "triton")


@pytest.fixture(params=[pytest.param(name, marks=getattr(pytest.mark, name)) for name in HF_BACKENDS])
def hf_backend(request, device, monkeypatch) -> str:
    from causal_conv1d_mps._backend import backend_unavailable_reason

    reason = backend_unavailable_reason(request.param, device)
    if reason is not None:
        pytest.skip(f"backend {request.param} on {device}: {reason}")
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", request.param)
    return request.param


@pytest.fixture(scope="module")
def torch_functions():
    """transformers' own PyTorch `causal_conv1d_fn` / `causal_conv1d_update` (LFM3's, undecorated)."""
    pytest.importorskip("transformers")
    skip_without_lfm3()
    from transformers.models.lfm3 import modeling_lfm3

    was_enabled = cc_hf.is_enabled()
    cc_hf.disable()
    functions = modeling_lfm3.causal_conv1d_fn, modeling_lfm3.causal_conv1d_update
    if was_enabled:
        cc_hf.enable()
    assert functions[0] is not cc_hf.causal_conv1d_fn
    return functions


def _packing(lengths, device):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).view(1, -1)
    return cu, seq_idx.to(device=device, dtype=torch.int32)


# --- packed sequences -------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["seq_idx", "cu_seqlens"])
@pytest.mark.parametrize("width", [4, 7])
def test_packed_sequences_match_the_oracle_with_gradients(hf_backend, device, form, width):
    """Each packed sequence is convolved alone: output and gradients of x, weight, bias match float64."""
    lengths = [5, 0, 9, 3]
    d, total = 6, sum(lengths)
    g = seeded(width)
    x = randn(1, d, total, device=device, generator=g)
    weight, bias = make_params(d, width, torch.float32, device, g)
    cu, seq_idx = _packing(lengths, device)
    packing = {"seq_idx": seq_idx} if form == "seq_idx" else {"cu_seqlens": cu}
    xs, ws, bs = leaf(x), leaf(weight), leaf(bias)
    out = cc_hf.causal_conv1d_fn(xs, ws, bs, activation="silu", **packing)
    ref, _ = oracle.causal_conv1d(leaf64(x), leaf64(weight), leaf64(bias), "silu", seq_idx=seq_idx)
    assert_close_rel(out, ref, torch.float32, "out")
    dout = randn(*out.shape, device=device, generator=g)
    grads = torch.autograd.grad(out, (xs, ws, bs), dout)
    x64, w64, b64 = leaf64(x), leaf64(weight), leaf64(bias)
    ref64, _ = oracle.causal_conv1d(x64, w64, b64, "silu", seq_idx=seq_idx)
    for name, got, want in zip(("dx", "dweight", "dbias"), grads,
                                oracle_grads([ref64], [dout], [x64, w64, b64])):
        assert_close_rel(got, want, torch.float32, name)


def test_cu_seqlens_states_are_per_sequence(hf_backend, device):
    """With cu_seqlens, initial and final states are `[N, D, W-1]`, one per packed sequence."""
    lengths, d, width = [4, 2, 7], 5, 4
    g = seeded(3)
    x = randn(1, d, sum(lengths), device=device, generator=g)
    weight, bias = make_params(d, width, torch.float32, device, g)
    init = randn(len(lengths), d, width - 1, device=device, generator=g)
    cu, _ = _packing(lengths, device)
    final_out = torch.full((len(lengths), d, width - 1), float("nan"), device=device)
    out, final = ccmps.causal_conv1d_fn(x, weight, bias, None, init, True, final_out, "silu", cu_seqlens=cu)
    assert final is final_out
    for n, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        ref, ref_final = oracle.causal_conv1d(x[:, :, start:end], weight, bias, "silu", initial_states=init[n:n + 1])
        assert_close_rel(out[:, :, start:end], ref, torch.float32, f"out of sequence {n}")
        assert_equal_exact(final[n:n + 1], ref_final.to(torch.float32), f"final state of sequence {n}")


def test_cu_seqlens_errors_name_the_argument(device):
    x = torch.randn(1, 4, 10, device=device)
    weight = torch.randn(4, 4, device=device)
    cu, seq_idx = _packing([3, 7], device)
    with pytest.raises(ValueError, match="seq_idx"):
        ccmps.causal_conv1d_fn(x, weight, seq_idx=seq_idx, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"x: expected shape \(1, D, total_T\)"):
        ccmps.causal_conv1d_fn(x.expand(2, -1, -1), weight, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens: expected to start at 0 and end at T=10"):
        ccmps.causal_conv1d_fn(x, weight, cu_seqlens=cu[:-1])


# --- activations and keyword arguments ---------------------------------------------------------------

@pytest.mark.parametrize("activation", [None, "silu", "swish"])
def test_activation_strings(hf_backend, device, activation):
    g = seeded(1)
    x = randn(2, 5, 11, device=device, generator=g)
    weight, bias = make_params(5, 4, torch.float32, device, g)
    ref, _ = oracle.causal_conv1d(x, weight, bias, activation)
    assert_close_rel(cc_hf.causal_conv1d_fn(x, weight, bias, activation), ref, torch.float32, "fn")
    state = randn(2, 5, 4, device=device, generator=g)
    token = randn(2, 5, 1, device=device, generator=g)
    ref_out, ref_state = oracle.causal_conv1d_update(token, state, weight, bias, activation)
    out = cc_hf.causal_conv1d_update(token, state, weight, bias, activation)
    assert_close_rel(out, ref_out, torch.float32, "update")
    assert_equal_exact(state, ref_state.to(torch.float32), "conv_state")


@pytest.mark.parametrize("activation", ["gelu", "relu", "SiLU", ""])
def test_other_activations_raise_a_clear_error_and_change_nothing(device, activation):
    x, weight = torch.randn(1, 3, 5, device=device), torch.randn(3, 4, device=device)
    state = torch.randn(1, 3, 4, device=device)
    before = state.clone()
    with pytest.raises(ValueError, match=f"activation: expected None, 'silu' or 'swish', got '{activation}'"):
        cc_hf.causal_conv1d_fn(x, weight, None, activation)
    with pytest.raises(ValueError, match="activation: expected None, 'silu' or 'swish'"):
        cc_hf.causal_conv1d_update(x[..., :1], state, weight, None, activation)
    assert torch.equal(state, before)


def test_keyword_arguments_of_the_layers_are_ignored(device):
    """The layers forward their **kwargs (positions, flash-attention lengths, flags); only packing counts."""
    g = seeded(2)
    x = randn(1, 4, 9, device=device, generator=g)
    weight, bias = make_params(4, 3, torch.float32, device, g)
    cu = torch.tensor([0, 9], dtype=torch.int32, device=device)
    plain = cc_hf.causal_conv1d_fn(x, weight, bias, "silu")
    noisy = cc_hf.causal_conv1d_fn(x, weight=weight, bias=bias, activation="silu", seq_idx=None,
                                   position_ids=torch.arange(9).view(1, -1), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                   max_length_q=9, max_length_k=9, output_attentions=False, use_cache=True)
    assert torch.equal(plain, noisy)


# --- transformers' call forms, cache layouts, strided views, dtypes ----------------------------------

def _call_forms(x, state, weight, bias, activation):
    """Every form the modeling files of transformers 5.15-5.24 use (`ast` scan of the installed package)."""
    return {
        "fn positional bias, keyword activation": (lambda f: f(x, weight, bias, activation=activation)),
        "fn keyword weight and bias": (lambda f: f(x, weight=weight, bias=bias, activation=activation)),
        "fn no activation": (lambda f: f(x, weight, bias)),
        "fn seq_idx=None keyword": (lambda f: f(x, weight, bias, seq_idx=None)),
        "update positional": (lambda f: f(x[..., -1:], state, weight, bias)),
        "update positional activation": (lambda f: f(x[..., -1:], state, weight, bias, activation)),
        "update keyword": (lambda f: f(x[..., -1:], state, weight=weight, bias=bias, activation=activation)),
    }


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_every_call_form_matches_transformers(hf_backend, device, torch_functions, activation, with_bias):
    torch_fn, torch_update = torch_functions
    g = seeded(5)
    x = randn(2, 7, 12, device=device, generator=g)
    weight, bias = make_params(7, 4, torch.float32, device, g, with_bias=with_bias)
    state = randn(2, 7, 4, device=device, generator=g)  # transformers' caches keep W columns
    for name, call in _call_forms(x, state, weight, bias, activation).items():
        is_update = name.startswith("update")
        ours_state, theirs_state = state.clone(), state.clone()
        if is_update:
            forms_ours = _call_forms(x, ours_state, weight, bias, activation)[name]
            forms_theirs = _call_forms(x, theirs_state, weight, bias, activation)[name]
            ours, theirs = forms_ours(cc_hf.causal_conv1d_update), forms_theirs(torch_update)
            assert_equal_exact(ours_state, theirs_state, f"{name}: conv_state")
        else:
            ours, theirs = call(cc_hf.causal_conv1d_fn), call(torch_fn)
        assert_close_rel(ours, theirs.double(), torch.float32, name)


def test_in_proj_split_views(hf_backend, device):
    """Mamba2's `split(...)[1].transpose(1, 2)` and LFM2's `transpose(-1, -2).chunk(3, dim=-2)` views."""
    g = seeded(7)
    b, t, d, width = 2, 10, 6, 4
    projected = randn(b, t, 3 * d + 5, device=device, generator=g)
    weight, bias = make_params(d, width, torch.float32, device, g)
    mamba_view = projected.split([2 * d + 2, d, 3], dim=-1)[1].transpose(1, 2)
    lfm_view = projected[..., :3 * d].transpose(-1, -2).chunk(3, dim=-2)[2]
    for name, view in (("mamba2 split", mamba_view), ("lfm2 chunk", lfm_view)):
        assert not view.is_contiguous()
        ref, _ = oracle.causal_conv1d(view, weight, bias, "silu")
        assert_close_rel(cc_hf.causal_conv1d_fn(view, weight, bias, activation="silu"), ref, torch.float32, name)
        state = randn(b, d, width, device=device, generator=g)
        ref_out, ref_state = oracle.causal_conv1d_update(view[..., -1:], state, weight, bias, "silu")
        out = cc_hf.causal_conv1d_update(view[..., -1:], state, weight, bias, "silu")
        assert_close_rel(out, ref_out, torch.float32, f"{name}: update")
        assert_equal_exact(state, ref_state.to(torch.float32), f"{name}: conv_state")


def test_a_cropped_cache_state_view_is_updated_in_place(hf_backend, device):
    """After `crop`, transformers keeps `conv_states[..., -W:]`, a view of a longer tensor."""
    g = seeded(8)
    weight, bias = make_params(5, 4, torch.float32, device, g)
    storage = randn(3, 5, 9, device=device, generator=g)
    state = storage[..., -4:]
    expected_state = state.clone()
    untouched = storage[..., :-4].clone()
    token = randn(3, 5, device=device, generator=g)  # the (B, D) form
    ref_out, ref_state = oracle.causal_conv1d_update(token, expected_state, weight, bias, "silu")
    out = cc_hf.causal_conv1d_update(token, state, weight, bias, "silu")
    assert out.shape == (3, 5)
    assert_close_rel(out, ref_out, torch.float32, "out")
    assert_equal_exact(storage[..., -4:], ref_state.to(torch.float32), "state inside its storage")
    assert_equal_exact(storage[..., :-4], untouched, "storage outside the state")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_weights_with_half_activations(hf_backend, device, dtype):
    g = seeded(9)
    x = randn(2, 8, 14, device=device, generator=g, dtype=dtype)
    weight, bias = make_params(8, 4, torch.float32, device, g)
    out = cc_hf.causal_conv1d_fn(x, weight, bias, activation="silu")
    assert out.dtype == dtype
    ref, _ = oracle.causal_conv1d(x, weight, bias, "silu")
    assert_close_rel(out, ref, dtype, "fn")
    state = randn(2, 8, 4, device=device, generator=g, dtype=dtype)
    ref_out, ref_state = oracle.causal_conv1d_update(x[..., -2:], state, weight, bias, "silu")
    out = cc_hf.causal_conv1d_update(x[..., -2:], state, weight, bias, "silu")
    assert out.dtype == dtype
    assert_close_rel(out, ref_out, dtype, "update")
    assert_equal_exact(state, ref_state.to(dtype), "conv_state")


def test_a_state_in_another_dtype_than_the_activations(device, torch_functions):
    """A cache created in float32 and bf16 activations: like transformers, the state keeps its dtype."""
    _, torch_update = torch_functions
    g = seeded(10)
    weight, bias = make_params(4, 4, torch.float32, device, g)
    token = randn(2, 4, 1, device=device, generator=g, dtype=torch.bfloat16)
    ours_state = randn(2, 4, 4, device=device, generator=g)
    theirs_state = ours_state.clone()
    out = cc_hf.causal_conv1d_update(token, ours_state, weight, bias, "silu")
    ref = torch_update(token, theirs_state, weight, bias, "silu")
    assert out.dtype == torch.bfloat16
    assert_close_rel(out, ref.double(), torch.bfloat16, "out")
    assert_equal_exact(ours_state, theirs_state, "conv_state")
