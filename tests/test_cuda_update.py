"""The CUDA C++ decode step (`causal_conv1d_mps/cuda/kernels/conv_update.cu`) against the float64 oracle.

On `--device cpu` the shipped source runs through `cuda_harness`, on `--device cuda` through NVRTC; the
launcher (`cuda.launch_update`) serves both (`allow_cpu=True` lets it take CPU tensors). Covered: widths 1 to
24, state lengths W-1, W and longer, both 16-bit dtypes, float32 weights, bias or none, identity and SiLU,
residual or not, D not a multiple of a block's channels, B = 1, strided x, a state that is a slice of a wider
cache, state slots (`conv_state_indices`: a permutation over more state rows, padding rows, a slot past the
rows), NaN payloads moved bit for bit, every case where the kernel declines (and leaves the state alone), the
public API's dispatch in shift mode only, the launch plans and the prepared driver launch.
"""

from __future__ import annotations

import pytest
import torch

import oracle
from conftest import (RecordingDriver, assert_close_rel, make_params, randn, seeded, skip_unless_cuda_kernel,
                      stand_in_cuda_driver)


@pytest.fixture
def update(device):
    """The launcher, on a device where the kernel can run (skips with the reason otherwise)."""
    from causal_conv1d_mps.cuda import launch_update

    skip_unless_cuda_kernel(device, "cc_conv_update", CC_RESIDUAL=1, CC_S=3, CC_SLOTS=0)
    return launch_update


def _inputs(B, D, W, S, dtype, wdtype, with_bias, device, seed, x_row=None, state_rows=None):
    """x `[B, 1, D]` (a slice of rows `x_row` wide), the state `[B, D, S]` (rows of a `state_rows`-channel
    cache), weight and bias."""
    gen = seeded(seed)
    x = randn(B, 1, x_row or D, dtype=dtype, device=device, generator=gen)[..., :D]
    state = randn(B, state_rows or D, S, dtype=dtype, device=device, generator=gen)[:, :D]
    weight, bias = make_params(D, W, wdtype, device, gen, with_bias)
    return x, state, weight, bias


def _check(update, x, state, weight, bias, activation, residual, name, slots=None):
    """One step through the launcher: out against the float64 oracle, the state bit for bit."""
    from causal_conv1d_mps import _activation

    want_out, want_state = oracle.short_conv_update(x, state, weight, bias, activation=activation == "silu",
                                                    residual=residual, conv_state_indices=slots)
    code = _activation.code(activation)
    out = update.conv_update(x, state, weight, bias, code, residual, slots, allow_cpu=True)
    assert out is not None, (name, update.why_not(x, state, weight, bias, code, slots))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close_rel(out, want_out, x.dtype, f"{name} out")
    assert torch.equal(state.cpu(), want_state), f"{name}: state"


# (B, D, W, S, x dtype, weight dtype, bias, activation, residual): every width to 8 and the limits, S = W-1,
# W and longer, D past one block of 256 channels, each option met at several widths
CASES = [
    (2, 6, 1, 1, torch.bfloat16, torch.bfloat16, True, "silu", True),
    (3, 10, 2, 1, torch.float16, torch.float32, False, None, False),
    (1, 258, 3, 3, torch.bfloat16, torch.float32, True, "silu", False),
    (2, 34, 4, 3, torch.bfloat16, torch.bfloat16, True, "silu", True),
    (2, 34, 4, 4, torch.float16, torch.float16, False, "silu", True),
    (3, 6, 5, 7, torch.float16, torch.float32, True, None, True),
    (1, 8, 6, 5, torch.bfloat16, torch.bfloat16, False, None, False),
    (2, 520, 7, 7, torch.bfloat16, torch.bfloat16, True, "silu", True),
    (2, 12, 8, 7, torch.float16, torch.float16, True, "silu", False),
    (1, 4, 16, 15, torch.bfloat16, torch.float32, True, "silu", True),
    (2, 6, 24, 32, torch.float16, torch.float16, False, "silu", True),
]


@pytest.mark.parametrize("B, D, W, S, dtype, wdtype, with_bias, activation, residual", CASES)
def test_matches_oracle(update, device, B, D, W, S, dtype, wdtype, with_bias, activation, residual):
    x, state, weight, bias = _inputs(B, D, W, S, dtype, wdtype, with_bias, device, B + D + W + S)
    _check(update, x, state, weight, bias, activation, residual, f"W{W} S{S}")


def test_strided_views(update, device):
    """x a slice of wider rows, the state a slice of a cache with more channels (its rows longer than D * S),
    and a bias of stride 2: the strides reach the kernel."""
    x, state, weight, _ = _inputs(3, 10, 4, 4, torch.bfloat16, torch.bfloat16, False, device, 5, x_row=14,
                                  state_rows=16)
    bias = randn(20, dtype=torch.bfloat16, device=device, generator=seeded(6))[::2]
    assert not x.is_contiguous() and not state.is_contiguous() and bias.stride(0) == 2
    _check(update, x, state, weight, bias, "silu", True, "strided")
    _check(update, x, state, weight.t().contiguous().t(), bias, "silu", True, "weight of strides (1, D)")


def test_state_slots(update, device):
    """With `conv_state_indices` each row reads and shifts the state slot it names among N > B rows; a
    negative slot is a padding row (output 0, no state touched), and so is a slot past the rows (what a GPU
    does with one: the api rejects it on CPU before any kernel)."""
    from causal_conv1d_mps import _activation

    x, _, weight, bias = _inputs(4, 10, 4, 3, torch.bfloat16, torch.bfloat16, True, device, 8)
    state = randn(7, 10, 3, dtype=torch.bfloat16, device=device, generator=seeded(9))
    slots = torch.tensor([5, 0, -1, 3], dtype=torch.int32, device=device)
    _check(update, x, state, weight, bias, "silu", True, "slots", slots)
    _check(update, x[:1], state, weight, bias, None, False, "one row, slot 6",
           torch.tensor([6], dtype=torch.int32, device=device))

    past = torch.tensor([2, 7, 4, 100], dtype=torch.int32, device=device)  # rows 1 and 3: past N = 7
    before = state.clone()
    out = update.conv_update(x, state, weight, bias, _activation.SILU, True, past, allow_cpu=True)
    want, want_state = oracle.short_conv_update(x[[0, 2]], before[[2, 4]], weight, bias)
    assert_close_rel(out[[0, 2]], want, torch.bfloat16, "live rows beside slots past N")
    assert torch.equal(out[[1, 3]], torch.zeros_like(out[[1, 3]])), "a slot past N is padding: output 0"
    expected = before.clone()
    expected[[2, 4]] = want_state.to(device)
    assert torch.equal(state, expected), "only the live rows' slots change"


def test_nan_payloads_move_bit_for_bit(update, device):
    """A NaN with a payload in the state reaches the output of its own channel only, and moves one step
    with its bits unchanged (the state is copied, never converted)."""
    from causal_conv1d_mps import _activation

    x, state, weight, bias = _inputs(2, 6, 3, 3, torch.bfloat16, torch.bfloat16, True, device, 7)
    bits = state.view(torch.int16)
    bits[1, 4, 2] = 0x7FC5  # a quiet NaN with payload 5, read by tap 1 of channel 4
    bits[0, 1, 0] = 0x7F81  # a signalling NaN pattern in the entry that drops out
    want_state = torch.cat([state[:, :, 1:], x.transpose(1, 2)], dim=2).clone()
    out = update.conv_update(x, state, weight, bias, _activation.IDENTITY, False, allow_cpu=True)
    assert torch.equal(state.view(torch.int16), want_state.view(torch.int16))
    assert state.view(torch.int16)[1, 4, 1] == 0x7FC5
    nan = torch.isnan(out.float())
    assert nan[1, 0, 4] and int(nan.sum()) == 1


def test_where_it_does_not_apply(update, device):
    """Each excluded case is named, declined with nothing written, and the state left as it was."""
    from causal_conv1d_mps import _activation

    silu = _activation.SILU
    x, state, w, b = _inputs(2, 8, 4, 3, torch.bfloat16, torch.bfloat16, True, device, 9)
    assert update.why_not(x, state, w, b, silu) is None
    wide_state = randn(2, 8, 33, dtype=torch.bfloat16, device=device)
    storage = randn(2 * 8 + 1, dtype=torch.bfloat16, device=device)
    slots = torch.tensor([1, 0], dtype=torch.int32, device=device)
    excluded = {
        "float32 x": (x.float(), state.float(), w.float(), b.float(), silu),
        "two tokens": (torch.cat([x, x], dim=1), state, w, b, silu),
        "odd D": (x[..., :7], state[:, :7], w[:7], b[:7], silu),
        "state of another dtype": (x, state.half(), w, b, silu),
        "state longer than MAX_STATE": (x, wide_state, w, b, silu),
        "state shorter than W - 1": (x, state[..., :2], w, b, silu),
        "state steps not contiguous": (x, state.transpose(1, 2).contiguous().transpose(1, 2), w, b, silu),
        "x channels not contiguous": (x.transpose(0, 2).contiguous().transpose(0, 2), state, w, b, silu),
        "x row stride odd": (randn(2, 1, 9, dtype=torch.bfloat16, device=device)[..., :8], state, w, b, silu),
        "x 2 bytes past 4": (storage[1:].view(2, 1, 8), state, w, b, silu),
        "W = 25": (x, randn(2, 8, 24, dtype=torch.bfloat16, device=device), randn(8, 25, dtype=torch.bfloat16,
                                                                                   device=device), b, silu),
        "float16 weight for bfloat16 x": (x, state, w.half(), b.half(), silu),
        "activation code 2": (x, state, w, b, 2),
        "int64 slots": (x, state, w, b, silu, slots.long()),
        "slots not contiguous": (x, state, w, b, silu, torch.tensor([1, 9, 0], dtype=torch.int32, device=device)[::2]),
        "one slot for two rows": (x, state, w, b, silu, slots[:1]),
        "state of other rows than x's without slots": (x, state[:1], w, b, silu),
    }
    for name, (xx, ss, ww, bb, act, *rest) in excluded.items():
        before = ss.clone()
        assert update.why_not(xx, ss, ww, bb, act, *rest) is not None, name
        assert update.conv_update(xx, ss, ww, bb, act, True, *rest, allow_cpu=True) is None, name
        assert torch.equal(ss, before), f"{name}: the state changed"
    # CPU tensors only when a test asks for the harness (on a GPU run too: these are the CPU copies)
    assert update.conv_update(x.cpu(), state.cpu(), w.cpu(), b.cpu(), silu, True) is None


def test_a_planned_signature_still_refuses_a_misaligned_address(update, device):
    from causal_conv1d_mps import _activation

    x, state, w, b = _inputs(1, 8, 4, 3, torch.bfloat16, torch.bfloat16, True, device, 11)
    storage = randn(18, dtype=torch.bfloat16, device=device, generator=seeded(12))
    aligned, misaligned = storage[2:10].view(1, 1, 8), storage[1:9].view(1, 1, 8)
    assert aligned.stride() == misaligned.stride() and aligned.data_ptr() % 4 == 0
    _check(update, aligned, state, w, b, "silu", True, "aligned")
    before = state.clone()
    assert update.conv_update(misaligned, state, w, b, _activation.SILU, True, allow_cpu=True) is None
    assert torch.equal(state, before)
    _check(update, aligned, state, w, b, "silu", True, "aligned again")


def test_plans_follow_every_part_of_the_signature(update, device, monkeypatch):
    """Each call differs from the one before in one part of its signature; all match the oracle (a plan
    reused across a changed field would not), and the table stays bounded."""
    monkeypatch.setattr(update, "_plans", {})
    base = dict(B=2, D=6, W=4, S=3, dtype=torch.bfloat16, wdtype=torch.bfloat16, with_bias=True)
    changes = [{}, dict(B=3), dict(D=8), dict(W=3), dict(S=4), dict(dtype=torch.float16, wdtype=torch.float16),
               dict(wdtype=torch.float32), dict(with_bias=False), dict(slots=True), {}]
    for i, change in enumerate(changes):
        p = {**base, **change}
        x, state, w, b = _inputs(p["B"], p["D"], p["W"], p["S"], p["dtype"], p["wdtype"], p["with_bias"], device,
                                 20 + i)
        slots = torch.tensor([1, 0], dtype=torch.int32, device=device) if p.get("slots") else None
        _check(update, x, state, w, b, "silu", True, f"{change}", slots)
    x, state, w, b = _inputs(2, 6, 4, 3, torch.bfloat16, torch.bfloat16, True, device, 40)
    for activation, residual in ((None, True), ("silu", False), (None, False)):
        _check(update, x, state, w, b, activation, residual, f"activation {activation}, residual {residual}")
    monkeypatch.setattr(update, "_MAX_PLANS", 3)
    for B in range(1, 6):
        x, state, w, b = _inputs(B, 6, 4, 3, torch.bfloat16, torch.bfloat16, True, device, 50 + B)
        _check(update, x, state, w, b, "silu", True, f"B {B}")
        assert len(update._plans) <= 3


def test_the_launcher_hands_the_driver_what_it_hands_the_harness(update, device, monkeypatch):
    """The pointer branch (the GPU's) against a stand-in driver: the grid, block and integers of the harness
    launch that the oracle tests verify, and each tensor's pointer in its slot."""
    from causal_conv1d_mps import _activation

    if device.type != "cpu":
        pytest.skip("the stand-in driver takes CPU tensors")
    x, state, w, b = _inputs(3, 300, 4, 4, torch.bfloat16, torch.float32, True, device, 60, x_row=304,
                             state_rows=302)
    silu = _activation.SILU
    monkeypatch.setattr(update, "_plans", {})
    assert update.conv_update(x, state, w, b, silu, True, allow_cpu=True) is not None
    (harness,) = update._plans.values()
    expected = (harness._grid, harness._block, harness._ints)
    assert expected[0] == (2, 3, 1) and expected[2] == [150, 152, 604, 150, w.stride(0), w.stride(1), 1, 3]

    driver = RecordingDriver(pointers=6, ints=8)
    monkeypatch.setattr(update, "_plans", {})
    stand_in_cuda_driver(monkeypatch, driver, stream=0x99)
    out = update.conv_update(x, state, w, b, silu, True, allow_cpu=True)
    (launch,) = driver.launches
    assert (launch["grid"], launch["block"], launch["args"][6:], launch["stream"]) == (*expected, 0x99)
    assert launch["args"][:6] == [t.data_ptr() for t in (x, state, w, b, x, out)]  # x: the slots' stand-in


@pytest.fixture
def served(update, monkeypatch):
    """The Triton backend forced, the launcher let through to CPU tensors, and whether each call it got
    was served."""
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "triton")
    calls = []
    real = update.conv_update

    def spy(*args, **kwargs):
        result = real(*args, **{**kwargs, "allow_cpu": True})
        calls.append(result is not None)
        return result

    monkeypatch.setattr(update, "conv_update", spy)
    return calls


def test_public_api_takes_it_in_shift_mode_only(served, device):
    """`short_conv_update` and `causal_conv1d_update` reach the kernel for one token in shift mode, with state
    slots too; circular mode goes to the Triton kernel without asking, two tokens per row after it declines.
    All match the oracle."""
    import causal_conv1d_mps as ccmps

    gen = seeded(70)
    weight, bias = make_params(6, 4, torch.bfloat16, device, gen)
    x = randn(2, 6, dtype=torch.bfloat16, device=device, generator=gen)
    state = randn(2, 6, 4, dtype=torch.bfloat16, device=device, generator=gen)
    want, want_state = oracle.short_conv_update(x, state, weight, bias)
    got = ccmps.short_conv_update(x, state, weight, bias)
    assert_close_rel(got, want, torch.bfloat16, "short_conv_update")
    assert torch.equal(state.cpu(), want_state)
    want, want_state = oracle.causal_conv1d_update(x, state, weight, bias, "silu")
    got = ccmps.causal_conv1d_update(x, state, weight, bias, "silu")
    assert_close_rel(got, want, torch.bfloat16, "causal_conv1d_update")
    assert torch.equal(state.cpu(), want_state)
    assert served == [True, True]

    seqlens = torch.tensor([1, 5], dtype=torch.int32, device=device)
    want, want_state = oracle.short_conv_update(x, state, weight, bias, cache_seqlens=seqlens)
    got = ccmps.short_conv_update(x, state, weight, bias, cache_seqlens=seqlens)
    assert_close_rel(got, want, torch.bfloat16, "circular")
    assert torch.equal(state.cpu(), want_state)
    slots = torch.tensor([1, 0], dtype=torch.int32, device=device)
    want, want_state = oracle.short_conv_update(x, state, weight, bias, conv_state_indices=slots)
    got = ccmps.short_conv_update(x, state, weight, bias, conv_state_indices=slots)
    assert_close_rel(got, want, torch.bfloat16, "state slots")
    assert torch.equal(state.cpu(), want_state)
    two = randn(2, 2, 6, dtype=torch.bfloat16, device=device, generator=gen)
    want, want_state = oracle.short_conv_update(two, state, weight, bias)
    got = ccmps.short_conv_update(two, state, weight, bias)
    assert_close_rel(got, want, torch.bfloat16, "two tokens")
    assert torch.equal(state.cpu(), want_state)
    assert served == [True, True, True, False], "circular mode does not ask; two tokens are declined"


def test_its_width_limit_is_the_triton_kernels():
    """Filters wider than the Triton kernels' limit go to the reference path before any kernel is asked, so
    the decode kernel's compiled widths (`_source`) stop at the same limit."""
    from causal_conv1d_mps import triton as triton_backend
    from causal_conv1d_mps.cuda import launch_update

    assert launch_update.MAX_WIDTH == triton_backend.MAX_WIDTH
