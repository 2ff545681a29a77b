"""Bad input (docs/CONTRACT.md section 4): the error class, a message naming the argument, and nothing half-done.

Validation happens in the api layer before any backend runs, so these tests use the device's
default backend rather than the `backend` fixture.

Mixed devices: besides a real second device (`--device cuda|mps`), a `meta` tensor next to CPU
tensors is used as the second device everywhere. Decision: the device check reads only metadata,
so it must reject `meta` like any other device; mixing cpu and meta is the portable ValueError test.
"""

from __future__ import annotations

import re

import pytest
import torch

import causal_conv1d_mps as ccmps

B, D, T, W = 2, 4, 6, 3


def _base(device):
    g = torch.Generator().manual_seed(60)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    return {
        "x_bdt": rnd(B, D, T),
        "x_btd": rnd(B, T, D),
        "weight": rnd(D, W),
        "bias": rnd(D),
        "states": rnd(B, D, W - 1),
        "conv_state": rnd(B, D, W + 1),
        "token": rnd(B, D),
        "seq_idx": torch.zeros(B, T, dtype=torch.int32, device=device),
        "final_out": torch.zeros(B, D, W - 1, device=device),
        "packed": rnd(1, 9, D),
        "rows": rnd(9, D),
    }


def _i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


# Each case: (error class, the argument the message must name, a function of (tensors, device) making the call).
CASES = {
    # causal_conv1d
    "cc_x_rank": (ValueError, "x", lambda t, dev: ccmps.causal_conv1d(t["x_bdt"][0], t["weight"])),
    "cc_x_integer": (TypeError, "x", lambda t, dev: ccmps.causal_conv1d(t["x_bdt"].long(), t["weight"])),
    "cc_weight_rank": (ValueError, "weight", lambda t, dev: ccmps.causal_conv1d(t["x_bdt"], t["weight"][:, None])),
    "cc_weight_channels": (ValueError, "weight",
                           lambda t, dev: ccmps.causal_conv1d(t["x_bdt"], torch.randn(D + 1, W, device=dev))),
    "cc_weight_integer": (TypeError, "weight", lambda t, dev: ccmps.causal_conv1d(t["x_bdt"], t["weight"].int())),
    "cc_bias_shape": (ValueError, "bias",
                      lambda t, dev: ccmps.causal_conv1d(t["x_bdt"], t["weight"], torch.randn(D + 1, device=dev))),
    "cc_bias_integer": (TypeError, "bias",
                        lambda t, dev: ccmps.causal_conv1d(t["x_bdt"], t["weight"], t["bias"].long())),
    "cc_activation": (ValueError, "activation",
                      lambda t, dev: ccmps.causal_conv1d(t["x_bdt"], t["weight"], None, "relu",
                                                         final_states_out=t["final_out"])),
    "cc_seq_idx_shape": (ValueError, "seq_idx",
                         lambda t, dev: ccmps.causal_conv1d(t["x_bdt"], t["weight"], seq_idx=t["seq_idx"][:, 1:])),
    "cc_seq_idx_float": (TypeError, "seq_idx",
                         lambda t, dev: ccmps.causal_conv1d(t["x_bdt"], t["weight"], seq_idx=t["seq_idx"].float(),
                                                            final_states_out=t["final_out"])),
    "cc_initial_states_width": (ValueError, "initial_states",
                                lambda t, dev: ccmps.causal_conv1d(t["x_bdt"], t["weight"],
                                                                   initial_states=torch.zeros(B, D, W, device=dev))),
    "cc_final_states_out_shape": (ValueError, "final_states_out",
                                  lambda t, dev: ccmps.causal_conv1d(t["x_bdt"], t["weight"],
                                                                     final_states_out=torch.zeros(B, D, W, device=dev))),
    "cc_mixed_devices_meta": (ValueError, "weight",
                              lambda t, dev: ccmps.causal_conv1d(t["x_bdt"], t["weight"].to("meta"))),
    "fn_activation": (ValueError, "activation",
                      lambda t, dev: ccmps.causal_conv1d_fn(t["x_bdt"], t["weight"], activation="gelu")),
    "fwd_x_rank": (ValueError, "x", lambda t, dev: ccmps.causal_conv1d_fwd(t["x_bdt"][None], t["weight"])),
    # short_conv_fused
    "fused_x_rank": (ValueError, "x", lambda t, dev: ccmps.short_conv_fused(t["x_btd"][0], t["weight"])),
    "fused_x_integer": (TypeError, "x", lambda t, dev: ccmps.short_conv_fused(t["x_btd"].int(), t["weight"])),
    "fused_weight_channels": (ValueError, "weight",
                              lambda t, dev: ccmps.short_conv_fused(t["x_btd"], t["weight"][1:])),
    "fused_activation": (ValueError, "activation",
                         lambda t, dev: ccmps.short_conv_fused(t["x_btd"], t["weight"], activation="relu")),
    "fused_initial_states_width": (ValueError, "initial_states",
                                   lambda t, dev: ccmps.short_conv_fused(t["x_btd"], t["weight"],
                                                                         initial_states=t["states"][..., :1])),
    "fused_cu_seqlens_not_monotone": (ValueError, "cu_seqlens",
                                      lambda t, dev: ccmps.short_conv_fused(t["packed"], t["weight"],
                                                                            cu_seqlens=_i32([0, 5, 3, 9], dev))),
    "fused_cu_seqlens_start": (ValueError, "cu_seqlens",
                               lambda t, dev: ccmps.short_conv_fused(t["packed"], t["weight"],
                                                                     cu_seqlens=_i32([1, 5, 9], dev))),
    "fused_cu_seqlens_end": (ValueError, "cu_seqlens",
                             lambda t, dev: ccmps.short_conv_fused(t["packed"], t["weight"],
                                                                   cu_seqlens=_i32([0, 5, 8], dev))),
    "fused_cu_seqlens_float": (TypeError, "cu_seqlens",
                               lambda t, dev: ccmps.short_conv_fused(t["packed"], t["weight"],
                                                                     cu_seqlens=torch.tensor([0.0, 9.0], device=dev))),
    "fused_cu_seqlens_batch": (ValueError, "cu_seqlens",
                               lambda t, dev: ccmps.short_conv_fused(t["x_btd"], t["weight"],
                                                                     cu_seqlens=_i32([0, T], dev))),
    "fused_cu_seqlens_states_rows": (ValueError, "initial_states",
                                     lambda t, dev: ccmps.short_conv_fused(
                                         t["packed"], t["weight"], initial_states=torch.zeros(3, D, W - 1, device=dev),
                                         cu_seqlens=_i32([0, 4, 9], dev))),
    "fused_mixed_devices_meta": (ValueError, "initial_states",
                                 lambda t, dev: ccmps.short_conv_fused(t["x_btd"], t["weight"],
                                                                       initial_states=t["states"].to("meta"))),
    # short_conv_update
    "update_x_rank": (ValueError, "x",
                      lambda t, dev: ccmps.short_conv_update(t["x_btd"][None], t["conv_state"], t["weight"])),
    "update_state_too_short": (ValueError, "conv_state",
                               lambda t, dev: ccmps.short_conv_update(t["token"], t["conv_state"][..., : W - 2],
                                                                      t["weight"])),
    "update_state_channels": (ValueError, "conv_state",
                              lambda t, dev: ccmps.short_conv_update(t["token"], t["conv_state"][:, 1:], t["weight"])),
    "update_state_rows": (ValueError, "conv_state",
                          lambda t, dev: ccmps.short_conv_update(t["token"], t["conv_state"][:1], t["weight"])),
    "update_cache_seqlens_float": (TypeError, "cache_seqlens",
                                   lambda t, dev: ccmps.short_conv_update(t["token"], t["conv_state"], t["weight"],
                                                                          cache_seqlens=torch.zeros(B, device=dev))),
    "update_cache_seqlens_shape": (ValueError, "cache_seqlens",
                                   lambda t, dev: ccmps.short_conv_update(t["token"], t["conv_state"], t["weight"],
                                                                          cache_seqlens=_i32([0, 0, 0], dev))),
    "update_indices_float": (TypeError, "conv_state_indices",
                             lambda t, dev: ccmps.short_conv_update(t["token"], t["conv_state"], t["weight"],
                                                                    conv_state_indices=torch.zeros(B, device=dev))),
    "update_mixed_devices_meta": (ValueError, "conv_state",
                                  lambda t, dev: ccmps.short_conv_update(t["token"], t["conv_state"].to("meta"),
                                                                         t["weight"])),
    "update_x_channels": (ValueError, "x",
                          lambda t, dev: ccmps.short_conv_update(t["token"][:, 1:], t["conv_state"], t["weight"])),
    "update_state_expanded": (ValueError, "conv_state",
                              lambda t, dev: ccmps.short_conv_update(t["token"], t["conv_state"][:1].expand(B, D, W + 1),
                                                                     t["weight"])),
    "update_state_interleaved": (ValueError, "conv_state",
                                 lambda t, dev: ccmps.short_conv_update(
                                     t["token"], t["conv_state"].view(-1)[:B * D * (W - 1)].as_strided(
                                         (B, D, W - 1), (D, 1, 1)), t["weight"])),
    "update_x_views_the_state": (ValueError, "x",
                                 lambda t, dev: ccmps.short_conv_update(t["conv_state"][:, :, 0], t["conv_state"],
                                                                        t["weight"])),
    "update_weight_views_the_state": (ValueError, "weight",
                                      lambda t, dev: ccmps.short_conv_update(t["token"], t["conv_state"],
                                                                             t["conv_state"][0, :, :W])),
    "update_state_leaf_requires_grad": (ValueError, "conv_state",
                                        lambda t, dev: ccmps.short_conv_update(
                                            t["token"], t["conv_state"].requires_grad_(True), t["weight"])),
    "cc_final_states_out_expanded": (ValueError, "final_states_out",
                                     lambda t, dev: ccmps.causal_conv1d(
                                         t["x_bdt"], t["weight"], final_states_out=t["final_out"][:1].expand(B, D, W - 1))),
    "cc_final_states_out_views_x": (ValueError, "final_states_out",
                                    lambda t, dev: ccmps.causal_conv1d(
                                        t["x_bdt"], t["weight"], final_states_out=t["x_bdt"][:, :, : W - 1])),
    "dao_update_x_channels": (ValueError, "x",
                              lambda t, dev: ccmps.causal_conv1d_update(t["token"][:, 1:], t["conv_state"], t["weight"])),
    # causal_conv1d_update (Dao layout)
    "dao_update_activation": (ValueError, "activation",
                              lambda t, dev: ccmps.causal_conv1d_update(t["token"], t["conv_state"], t["weight"],
                                                                        activation="relu")),
    "dao_update_x_rank": (ValueError, "x",
                          lambda t, dev: ccmps.causal_conv1d_update(t["token"][0], t["conv_state"], t["weight"])),
    # causal_conv1d_varlen_states
    "varlen_x_rank": (ValueError, "x",
                      lambda t, dev: ccmps.causal_conv1d_varlen_states(t["packed"], _i32([0, 9], dev), 2)),
    "varlen_cu_seqlens_end": (ValueError, "cu_seqlens",
                              lambda t, dev: ccmps.causal_conv1d_varlen_states(t["rows"], _i32([0, 4, 7], dev), 2)),
    "varlen_cu_seqlens_float": (TypeError, "cu_seqlens",
                                lambda t, dev: ccmps.causal_conv1d_varlen_states(
                                    t["rows"], torch.tensor([0.0, 9.0], device=dev), 2)),
}


def _snapshot(tensors):
    return {name: t.clone() for name, t in tensors.items()}


def _assert_unchanged(tensors, before):
    for name, t in tensors.items():
        assert torch.equal(t, before[name]), f"{name} was modified by a call that raised"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_and_changes_nothing(device, case):
    error, argument, call = CASES[case]
    tensors = _base(device)
    before = _snapshot(tensors)
    with pytest.raises(error) as info:
        call(tensors, device)
    message = str(info.value)
    named = re.search(rf"(?<![\w.]){re.escape(argument)}(?!\w)", message)  # the word, not a part of one
    assert named, f"{case}: the message does not name {argument!r}: {message}"
    if "meta" in case:
        assert "meta" in message and device.type in message, f"{case}: the message does not name the devices"
    _assert_unchanged(tensors, before)


@pytest.mark.parametrize("mode", ["shift", "circular"])
def test_out_of_range_state_index_rejected_on_cpu_without_writing(mode):
    """Row 0 is valid, row 1 points past the cache: nothing may be written, not even row 0's slot."""
    tensors = _base(torch.device("cpu"))
    state = torch.randn(3, D, W + 1)
    before_state, before_token = state.clone(), tensors["token"].clone()
    seqlens = _i32([1, 2], "cpu") if mode == "circular" else None
    with pytest.raises((ValueError, IndexError)) as info:
        ccmps.short_conv_update(tensors["token"], state, tensors["weight"], None, seqlens,
                                conv_state_indices=_i32([0, 3], "cpu"))
    assert "conv_state_indices" in str(info.value)
    assert torch.equal(state, before_state), "conv_state changed by a call that raised"
    assert torch.equal(tensors["token"], before_token)


@pytest.mark.parametrize("error_case", ["bad_seq_idx", "bad_activation"])
def test_final_states_out_untouched_on_error(device, error_case):
    tensors = _base(device)
    buffer = torch.full((B, D, W - 1), 7.0, device=device)
    kwargs = {"seq_idx": tensors["seq_idx"].float()} if error_case == "bad_seq_idx" else {}
    activation = "relu" if error_case == "bad_activation" else None
    with pytest.raises((TypeError, ValueError)):
        ccmps.causal_conv1d(tensors["x_bdt"], tensors["weight"], None, activation, final_states_out=buffer, **kwargs)
    assert (buffer == 7.0).all(), "final_states_out written by a call that raised"


def test_update_state_dtype_must_match_x(device):
    """docs/CONTRACT.md section 3.6: the state has x's dtype (it stores inputs); another dtype is refused, not
    converted."""
    tensors = _base(device)
    state = tensors["conv_state"].double() if device.type != "mps" else tensors["conv_state"].half()
    before = state.clone()
    with pytest.raises((TypeError, ValueError)) as info:
        ccmps.short_conv_update(tensors["token"], state, tensors["weight"])
    assert "conv_state" in str(info.value)
    assert torch.equal(state, before)


def test_mixed_real_devices(device):
    """x on the accelerator, weight on the CPU: a ValueError naming both devices."""
    if device.type == "cpu":
        pytest.skip("needs a second real device: run with --device cuda or --device mps")
    tensors = _base(device)
    with pytest.raises(ValueError) as info:
        ccmps.causal_conv1d(tensors["x_bdt"], tensors["weight"].cpu())
    message = str(info.value)
    assert "cpu" in message and device.type in message, message


def test_unknown_backend_name_is_reported(monkeypatch):
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "cuda-graphs")
    tensors = _base(torch.device("cpu"))
    with pytest.raises(ValueError) as info:
        ccmps.causal_conv1d(tensors["x_bdt"], tensors["weight"])
    assert "CAUSAL_CONV1D_BACKEND" in str(info.value)


def test_duplicate_state_indices_rejected_on_cpu_without_writing():
    """Two rows naming one slot would race on it: rejected where checking is free (CPU), nothing written."""
    tensors = _base(torch.device("cpu"))
    state = torch.randn(3, D, W + 1)
    before = state.clone()
    with pytest.raises(ValueError) as info:
        ccmps.short_conv_update(torch.randn(3, D), state, tensors["weight"], None, None,
                                conv_state_indices=_i32([2, -1, 2], "cpu"))
    assert "conv_state_indices" in str(info.value) and "2" in str(info.value)
    assert torch.equal(state, before)
    # padding rows may repeat: -1 twice is fine
    ccmps.short_conv_update(torch.randn(3, D), state, tensors["weight"], None, None,
                            conv_state_indices=_i32([-1, 0, -1], "cpu"))


def test_leaf_state_is_updated_under_no_grad():
    """The leaf-requires-grad refusal follows PyTorch's in-place rule: under no_grad the update happens."""
    tensors = _base(torch.device("cpu"))
    state = tensors["conv_state"].clone().requires_grad_(True)
    before = state.detach().clone()
    with torch.no_grad():
        ccmps.short_conv_update(tensors["token"], state, tensors["weight"])
    assert not torch.equal(state.detach(), before)


def test_non_leaf_state_requiring_grad_is_written_as_plain_memory(device):
    """A state computed with autograd (e.g. final states of a prefill) is updated in place, never differentiated."""
    tensors = _base(device)
    source = tensors["conv_state"].clone().requires_grad_(True)
    state = source * 1.0
    expected = state.detach().clone()
    expected[:, :, :-1] = expected[:, :, 1:].clone()
    expected[:, :, -1] = tensors["token"]
    ccmps.short_conv_update(tensors["token"], state, tensors["weight"])
    assert torch.equal(state.detach(), expected)


@pytest.mark.parametrize("case", ["expanded_state", "x_views_state", "final_states_out_overlap"])
def test_aliasing_errors_are_the_same_on_every_backend(backend, device, case):
    """Validation runs in the api before any backend: the same error and message everywhere."""
    tensors = _base(device)
    before = _snapshot(tensors)
    with pytest.raises(ValueError) as info:
        if case == "expanded_state":
            ccmps.short_conv_update(tensors["token"], tensors["conv_state"][:1].expand(B, D, W + 1), tensors["weight"])
        elif case == "x_views_state":
            ccmps.short_conv_update(tensors["conv_state"][:, :, 0], tensors["conv_state"], tensors["weight"], None,
                                    torch.zeros(B, dtype=torch.int32, device=device))
        else:
            ccmps.causal_conv1d(tensors["x_bdt"], tensors["weight"], final_states_out=tensors["final_out"][:, :1].expand(
                B, D, W - 1))
    name = {"expanded_state": "conv_state", "x_views_state": "x", "final_states_out_overlap": "final_states_out"}[case]
    assert str(info.value).startswith(name + ":"), str(info.value)
    _assert_unchanged(tensors, before)
