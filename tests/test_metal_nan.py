"""NaN/Inf containment in the Metal kernels (through the Linux harness): what is outside a sequence never
influences it, forward and backward; and positions read from the inputs never leave their tensors. Each case
plants NaN where it must have no effect and compares with the reference path run on the same inputs with
those NaN replaced by 0 (finite inputs: no reliance on the reference's own NaN handling)."""
from __future__ import annotations

import pytest
import torch

from causal_conv1d_mps import metal, reference
from causal_conv1d_mps._activation import IDENTITY, SILU

_REASON = metal.unsupported_reason(torch.device("cpu"), torch.float32)
pytestmark = [pytest.mark.metal, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]

NAN = float("nan")


def _close(name, got, want):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert not torch.isnan(got).any(), f"{name}: {int(torch.isnan(got).sum())} NaN leaked in"
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _zeroed(t):
    return None if t is None else torch.nan_to_num(t, nan=0.0)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("width", [4, 19])  # 19: the generic-width kernels
def test_causal_conv1d_padding_positions_hold_nan_without_effect(width):
    b, d, t = 2, 5, 40
    seq = torch.tensor([0] * 12 + [-1] * 6 + [1] * 16 + [2] * 6, dtype=torch.int32).repeat(b, 1)
    x, dout = _rand(b, d, t, seed=1), _rand(b, d, t, seed=2)
    weight, bias, init = _rand(d, width, seed=3), _rand(d, seed=4), _rand(b, d, width - 1, seed=5)
    x[:, :, 12:18] = NAN  # padding (seq_idx < 0)
    dout[:, :, 12:18] = NAN
    out, _ = metal.causal_conv1d_fwd(x, weight, bias, seq, init, SILU, False)
    want, _ = reference.causal_conv1d_fwd(_zeroed(x), weight, bias, seq, init, SILU, False)
    _close("out", out, want)
    assert torch.equal(out[:, :, 12:18], torch.zeros_like(out[:, :, 12:18])), "padding output is not exactly 0"
    got = metal.causal_conv1d_bwd(x, weight, bias, seq, init, dout, None, SILU)
    want = reference.causal_conv1d_bwd(_zeroed(x), weight, bias, seq, init, _zeroed(dout), None, SILU)
    for name, g, w in zip(("dx", "dweight", "dbias", "dinitial_states"), got, want):
        _close(name, g, w)
    assert torch.equal(got[0][:, :, 12:18], torch.zeros_like(got[0][:, :, 12:18])), "padding dx is not exactly 0"


@pytest.mark.parametrize("width", [4, 19])
def test_causal_conv1d_nan_in_one_sequence_and_its_states_stays_there(width):
    b, d, t = 1, 6, 37
    seq = torch.tensor([[0] * 10 + [1] * 15 + [2] * 12], dtype=torch.int32)
    x, dout = _rand(b, d, t, seed=6), _rand(b, d, t, seed=7)
    weight, bias, init = _rand(d, width, seed=8), _rand(d, seed=9), _rand(b, d, width - 1, seed=10)
    x[:, :, 4] = NAN  # sequence 0
    init[:, :, 0] = NAN  # the states belong to sequence 0 (position 0's)
    dout[:, :, 6] = NAN
    later = slice(10, t)
    out, _ = metal.causal_conv1d_fwd(x, weight, bias, seq, init, SILU, False)
    want, _ = reference.causal_conv1d_fwd(_zeroed(x), weight, bias, seq, _zeroed(init), SILU, False)
    _close("out of sequences 1 and 2", out[:, :, later], want[:, :, later])
    assert torch.isnan(out[:, :, 4]).all(), "NaN inside its own sequence must propagate"
    dx = metal.causal_conv1d_bwd(x, weight, bias, seq, init, dout, None, SILU)[0]
    want_dx = reference.causal_conv1d_bwd(_zeroed(x), weight, bias, seq, _zeroed(init), _zeroed(dout), None, SILU)[0]
    _close("dx of sequences 1 and 2", dx[:, :, later], want_dx[:, :, later])


@pytest.mark.parametrize("width", [4, 19])
def test_short_conv_fused_masked_positions_hold_nan_without_effect(width):
    b, t, d = 2, 30, 6
    x, dout = _rand(b, t, d, seed=11), _rand(b, t, d, seed=12)
    weight, bias, init = _rand(d, width, seed=13), _rand(d, seed=14), _rand(b, d, width - 1, seed=15)
    mask = torch.ones(b, t)
    hidden = torch.zeros(b, t, dtype=torch.bool)
    hidden[0, [3, 4, 17, 29]] = True  # 29: inside the final states
    hidden[1, [0, 28]] = True
    mask[hidden] = 0.0
    mask[1, 5] = 0.5  # a non-zero mask value still scales
    x[hidden] = NAN
    out, final = metal.short_conv_fused_fwd(x, weight, bias, mask, init, None, SILU, True, True)
    want, want_final = reference.short_conv_fused_fwd(_zeroed(x), weight, bias, mask, init, None, SILU, True, True)
    assert torch.isnan(out[hidden]).all(), "the residual adds the unmasked x at its own position"
    _close("out elsewhere", out[~hidden], want[~hidden])
    _close("final_states", final, want_final)
    assert final[0, :, -1].eq(0).all(), "a masked position holds 0 in the final states"
    got = metal.short_conv_fused_bwd(x, weight, bias, mask, init, None, dout, _rand(b, d, width - 1, seed=16),
                                     SILU, True)
    want = reference.short_conv_fused_bwd(_zeroed(x), weight, bias, mask, init, None, dout,
                                          _rand(b, d, width - 1, seed=16), SILU, True)
    for name, g, w in zip(("dx", "dweight", "dbias", "dinitial_states"), got, want):
        _close(name, g, w)


@pytest.mark.parametrize("width", [4, 19])
def test_short_conv_fused_nan_in_one_packed_sequence_stays_there(width):
    t, d = 45, 5
    cu = torch.tensor([0, 12, 30, 45], dtype=torch.int32)
    x, dout = _rand(1, t, d, seed=17), _rand(1, t, d, seed=18)
    weight, bias, init = _rand(d, width, seed=19), _rand(d, seed=20), _rand(3, d, width - 1, seed=21)
    x[0, 20] = NAN  # sequence 1
    init[1] = NAN
    others = torch.cat([torch.arange(0, 12), torch.arange(30, 45)])
    out, final = metal.short_conv_fused_fwd(x, weight, bias, None, init, cu, SILU, False, True)
    want, want_final = reference.short_conv_fused_fwd(_zeroed(x), weight, bias, None, _zeroed(init), cu, SILU,
                                                      False, True)
    _close("out of sequences 0 and 2", out[0, others], want[0, others])
    _close("final states of sequences 0 and 2", final[[0, 2]], want_final[[0, 2]])
    got = metal.short_conv_fused_bwd(x, weight, bias, None, init, cu, dout, None, SILU, False)
    want = reference.short_conv_fused_bwd(_zeroed(x), weight, bias, None, _zeroed(init), cu, dout, None, SILU,
                                          False)
    _close("dx of sequences 0 and 2", got[0][0, others], want[0][0, others])
    _close("dinitial_states of sequences 0 and 2", got[3][[0, 2]], want[3][[0, 2]])


@pytest.mark.parametrize("circular", [False, True])
def test_decode_padding_rows_output_zero_and_touch_nothing(circular):
    b, d, w, s = 3, 7, 4, 5
    x = _rand(b, 2, d, seed=22)
    x[1] = NAN  # the padding row's input
    state = _rand(4, d, s, seed=23)
    state[2] = NAN  # a slot no row uses
    weight, bias = _rand(d, w, seed=24), _rand(d, seed=25)
    indices = torch.tensor([3, -1, 0], dtype=torch.int32)
    seqlens = torch.tensor([1, 4, 2], dtype=torch.int32) if circular else None
    got_state = state.clone()
    out = metal.short_conv_update(x, got_state, weight, bias, seqlens, indices, SILU, True)
    want_state = state.clone()
    want = reference.short_conv_update(_zeroed(x), want_state, weight, bias, seqlens, indices, SILU, True)
    assert torch.equal(out[1], torch.zeros_like(out[1])), "padding row output is not exactly 0"
    _close("out of the other rows", out[[0, 2]], want[[0, 2]])
    assert torch.equal(got_state.nan_to_num(7.0), want_state.nan_to_num(7.0)), "state rows differ"


def test_circular_positions_never_leave_the_state_whatever_cache_seqlens_holds():
    """The kernel reduces cache_seqlens modulo S itself: extreme values write inside the state view only."""
    b, d, w, s, steps = 4, 3, 4, 6, 3
    big = _rand(b, d, s + 5, seed=26)
    state = big[:, :, 2:2 + s]  # a view inside a larger tensor
    x, weight = _rand(b, steps, d, seed=27), _rand(d, w, seed=28)
    seqlens = torch.tensor([-1, -5, 2**31 - 1, -2**31], dtype=torch.int32)
    before = big.clone()
    out = metal.short_conv_update(x, state, weight, None, seqlens, None, IDENTITY, False)
    reduced = (seqlens.long() % s).int()
    want_state = before[:, :, 2:2 + s].clone()
    want = reference.short_conv_update(x, want_state, weight, None, reduced, None, IDENTITY, False)
    _close("out", out, want)
    assert torch.equal(state, want_state), "state differs from the update at the reduced positions"
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[:, :, 2:2 + s] = False
    assert torch.equal(big[outside], before[outside]), "an element outside the state view was written"


def test_cu_seqlens_ending_before_t_never_reads_past_its_last_entry():
    """On GPUs cu_seqlens values are not checked (no host sync): the kernels must stay inside the tensor.
    The harness guards every buffer, so a read past cu_seqlens' end would raise."""
    t, d, w = 20, 4, 3
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)  # ends at 10 < T
    x, weight = _rand(1, t, d, seed=29), _rand(d, w, seed=30)
    out, _ = metal.short_conv_fused_fwd(x, weight, None, None, None, cu, IDENTITY, False, False)
    want, _ = reference.short_conv_fused_fwd(x[:, :10], weight, None, None, None, cu, IDENTITY, False, False)
    _close("out of the described sequences", out[:, :10], want)
