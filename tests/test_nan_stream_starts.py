"""A NaN/Inf gradient among a stream's first W-1 outputs, without `initial_states` (docs/CONTRACT.md
section 7, item 5).

The W-1 positions before a stream start are zeros that are still inputs: tap k of an output at offset
`j < W-1-k` from the start reads one of them, so a non-finite `dpre` there makes `dweight[:, k]` NaN
(`NaN * 0`, `Inf * 0`), exactly as with `initial_states = zeros`. Which starts count:
- plain rows (both ops): t = 0 of every row;
- `seq_idx`: the row start only, for the outputs of the sequence of position 0 that are not padding; a
  sequence starting mid-row reads another sequence (or padding) there, which is masked and adds nothing;
- `cu_seqlens`: every packed sequence start.
An attention mask changes nothing here: a masked position's input is 0 by selection, but its dpre still
multiplies the zeros before the start.

Each channel gets one non-finite `dout` at a chosen stream offset, `x` stays finite. The gradients are
compared entry by entry (NaN/+Inf/-Inf pattern, finite values at tolerance) with the reference path
(`causal_conv1d_mps.reference`) on the same inputs, and the taps reaching before the start are checked
against the rule above, so that the expectation itself is pinned down.
"""

from __future__ import annotations

import pytest
import torch

import causal_conv1d_mps as ccmps
from causal_conv1d_mps import reference
from causal_conv1d_mps._activation import IDENTITY, SILU
from conftest import assert_close_nonfinite, leaf

NAN, INF = float("nan"), float("inf")


def _rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _check_against_reference(got: list, want: list, names: tuple) -> None:
    for g, w, name in zip(got, want, names):
        assert_close_nonfinite(g, w, torch.float32, name)


def _check_start_taps(dweight: torch.Tensor, plants: list, width: int) -> None:
    """`plants`: `(channel, offset j from the stream start, whether that start counts)`. The taps
    k < W-1-j of that channel read before the start: NaN if the start counts, else finite."""
    dweight = dweight.detach().cpu()
    for d, j, counts in plants:
        before = dweight[d, :max(width - 1 - j, 0)]
        if counts:
            assert torch.isnan(before).all(), (
                f"channel {d}: a non-finite dpre at offset {j} of a counting stream start must make "
                f"dweight[{d}, :{width - 1 - j}] NaN (the zeros before the start are inputs), got {before.tolist()}")
        else:
            assert torch.isfinite(before).all(), (
                f"channel {d}: taps before a mid-row start read another sequence and must add nothing, "
                f"got {before.tolist()}")


def _causal_grads(x, weight, bias, seq_idx, dout, silu: bool, channel_last: bool, device, final_grad: bool):
    """(dx, dweight, dbias) of `causal_conv1d` (no initial_states) on `device` through the forced backend."""
    xd = x.to(device)
    if channel_last:
        xd = xd.transpose(1, 2).contiguous().transpose(1, 2)
    xg, wg, bg = leaf(xd), leaf(weight.to(device)), leaf(bias.to(device))
    sd = None if seq_idx is None else seq_idx.to(device)
    out, final = ccmps.causal_conv1d(xg, wg, bg, "silu" if silu else None, seq_idx=sd, return_final_states=True)
    if final_grad:  # a gradient on the final states: the main kernel's job, the start kernel must not mind
        dfinal = _rand(*final.shape, seed=99)
        torch.autograd.backward([out, final], [dout.to(device), dfinal.to(device)])
    else:
        dfinal = None
        out.backward(dout.to(device))
    want = reference.causal_conv1d_bwd(x, weight, bias, seq_idx, None, dout, dfinal, SILU if silu else IDENTITY)
    return [xg.grad, wg.grad, bg.grad], list(want[:3])


@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_causal_conv1d_rows_start_at_zero(backend, device, channel_last, silu):
    b, d, t, width = 2, 4, 7, 4
    x, weight, bias = _rand(b, d, t, seed=1), _rand(d, width, seed=2) * 0.5, _rand(d, seed=3)
    dout = _rand(b, d, t, seed=4)
    dout[0, 0, 0] = NAN   # offset 0: taps 0..2 reach before t = 0
    dout[1, 1, 1] = INF   # offset 1: taps 0..1
    dout[1, 2, 2] = -INF  # offset 2: tap 0
    # channel 3 stays finite
    got, want = _causal_grads(x, weight, bias, None, dout, silu, channel_last, device, final_grad=channel_last)
    _check_against_reference(got, want, ("dx", "dweight", "dbias"))
    _check_start_taps(got[1], [(0, 0, True), (1, 1, True), (2, 2, True)], width)
    assert torch.isfinite(got[1][3]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_causal_conv1d_rows_start_at_zero_16bit(backend, device, dtype):
    """16-bit (B, D, T) with T a multiple of 8: the shapes that other kernels of a backend may serve."""
    b, d, t, width = 2, 8, 16, 4
    x, weight, bias = (_rand(b, d, t, seed=21).to(dtype), (_rand(d, width, seed=22) * 0.5).to(dtype),
                       _rand(d, seed=23).to(dtype))
    dout = _rand(b, d, t, seed=24).to(dtype)
    dout[0, 0, 0] = NAN
    dout[1, 3, 1] = -INF
    dout[1, 5, 9] = NAN  # not near a start: every tap is NaN through x anyway
    xg, wg, bg = leaf(x.to(device)), leaf(weight.to(device)), leaf(bias.to(device))
    ccmps.causal_conv1d(xg, wg, bg, "silu").backward(dout.to(device))
    want = reference.causal_conv1d_bwd(x, weight, bias, None, None, dout, None, SILU)
    for g, w, name in zip((xg.grad, wg.grad, bg.grad), want, ("dx", "dweight", "dbias")):
        assert_close_nonfinite(g, w, dtype, name)
    _check_start_taps(wg.grad, [(0, 0, True), (3, 1, True)], width)


@pytest.mark.parametrize("silu", [False, True])
def test_causal_conv1d_seq_idx_counts_the_row_start_only(backend, device, silu):
    b, d, t, width = 2, 5, 10, 4
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2],
                            [-1, -1, 3, 3, 3, 4, 4, 4, 4, 4]], dtype=torch.int64)
    x, weight, bias = _rand(b, d, t, seed=5), _rand(d, width, seed=6) * 0.5, _rand(d, seed=7)
    dout = _rand(b, d, t, seed=8)
    dout[0, 0, 1] = NAN   # sequence 0 = position 0's, offset 1: counts
    dout[0, 1, 3] = NAN   # sequence 1 starts mid-row (offset 0): its taps before read sequence 0
    dout[1, 2, 2] = INF   # sequence 3 starts after padding: the row's position-0 sequence is padding
    dout[1, 3, 0] = NAN   # padding: never flows back at all
    dout[0, 4, 8] = -INF  # sequence 2, mid-row start, offset 0
    got, want = _causal_grads(x, weight, bias, seq_idx, dout, silu, False, device, final_grad=False)
    _check_against_reference(got, want, ("dx", "dweight", "dbias"))
    _check_start_taps(got[1], [(0, 1, True), (1, 0, False), (2, 0, False), (4, 0, False)], width)
    assert torch.isfinite(got[1][3]).all() and torch.isfinite(got[2][3]), "dout at padding must not flow back"


def _fused_grads(x, weight, bias, mask, cu_seqlens, dout, device, activation=True, residual=True):
    """(dx, dweight, dbias) of `short_conv_fused` (no initial_states) through the forced backend."""
    xg, wg, bg = leaf(x.to(device)), leaf(weight.to(device)), leaf(bias.to(device))
    out = ccmps.short_conv_fused(xg, wg, bg, None if mask is None else mask.to(device), activation, residual,
                                 cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(device))
    out.backward(dout.to(device))
    want = reference.short_conv_fused_bwd(x, weight, bias, mask, None, cu_seqlens, dout, None,
                                          SILU if activation else IDENTITY, residual)
    return [xg.grad, wg.grad, bg.grad], list(want[:3])


def _attention_mask(b: int, t: int, kind: str, zeros: list) -> torch.Tensor | None:
    """None, or a `[B, T]` mask (bool, or float with non-binary values) that is 0 at `zeros` `(b, t)`."""
    if kind == "none":
        return None
    mask = torch.ones(b, t) if kind == "bool" else 0.25 + torch.rand(b, t, generator=torch.Generator().manual_seed(0))
    for i, j in zeros:
        mask[i, j] = 0
    return mask.bool() if kind == "bool" else mask


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_short_conv_fused_rows_start_at_zero(backend, device, mask_kind):
    b, t, d, width = 2, 6, 3, 3
    x, weight, bias = _rand(b, t, d, seed=9), _rand(d, width, seed=10) * 0.5, _rand(d, seed=11)
    mask = _attention_mask(b, t, mask_kind, zeros=[(1, 0), (0, 3)])
    if mask is not None:
        x[1, 0, :] = NAN  # masked out: contributes nothing, but its dpre still multiplies the zeros before
    dout = _rand(b, t, d, seed=12)
    dout[1, 0, 0] = NAN  # offset 0 (masked position when there is a mask): taps 0..1
    dout[0, 1, 1] = INF  # offset 1: tap 0
    got, want = _fused_grads(x, weight, bias, mask, None, dout, device, residual=mask_kind != "float")
    _check_against_reference(got, want, ("dx", "dweight", "dbias"))
    _check_start_taps(got[1], [(0, 0, True), (1, 1, True)], width)
    assert torch.isfinite(got[1][2]).all()


@pytest.mark.parametrize("mask_kind", ["none", "bool"])
def test_short_conv_fused_every_packed_sequence_start_counts(backend, device, mask_kind):
    # sequences of lengths 3, 0 (empty), 5, 1 (shorter than W-1), 4
    cu_seqlens = torch.tensor([0, 3, 3, 8, 9, 13], dtype=torch.int32)
    t, d, width = 13, 5, 5
    x, weight, bias = _rand(1, t, d, seed=13), _rand(d, width, seed=14) * 0.5, _rand(d, seed=15)
    mask = _attention_mask(1, t, mask_kind, zeros=[(0, 3), (0, 10)])
    dout = _rand(1, t, d, seed=16)
    dout[0, 3, 0] = NAN    # start of the third sequence (masked position when there is a mask)
    dout[0, 8, 1] = -INF   # the one-step sequence
    dout[0, 11, 2] = INF   # offset 2 of the last sequence: taps 0..1
    dout[0, 1, 3] = NAN    # offset 1 of the first sequence: taps 0..2
    # channel 4 stays finite
    got, want = _fused_grads(x, weight, bias, mask, cu_seqlens, dout, device, activation=mask is None)
    _check_against_reference(got, want, ("dx", "dweight", "dbias"))
    _check_start_taps(got[1], [(0, 0, True), (1, 0, True), (2, 2, True), (3, 1, True)], width)
    assert torch.isfinite(got[1][4]).all()


@pytest.mark.parametrize("op", ["causal_conv1d_seq_idx", "short_conv_fused_cu_seqlens"])
def test_nan_input_reaches_the_start_taps_through_the_recomputed_silu(backend, device, op):
    """A NaN in `x` (finite `dout`) makes `dpre = dout * silu'(pre)` NaN at the outputs reading it: the
    backward recomputes `pre`, so the taps before the start must see that NaN too."""
    t, d, width = 8, 3, 4
    dout = _rand(1, t, d, seed=17)
    weight, bias = _rand(d, width, seed=18) * 0.5, _rand(d, seed=19)
    x = _rand(1, t, d, seed=20)
    x[0, 2, 0] = NAN  # offset 2 of the first sequence: pre NaN at t = 2 only there, tap 0 reaches before
    x[0, 4, 1] = NAN  # offset 1 of the second sequence (a mid-row start with seq_idx: taps before masked)
    if op == "causal_conv1d_seq_idx":
        seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
        x, dout = x.transpose(1, 2).contiguous(), dout.transpose(1, 2).contiguous()  # [B, D, T]
        got, want = _causal_grads(x, weight, bias, seq_idx, dout, True, False, device, final_grad=False)
        plants = [(0, 2, True)]
    else:
        got, want = _fused_grads(x, weight, bias, None, torch.tensor([0, 3, 8]), dout, device, residual=False)
        plants = [(0, 2, True), (1, 1, True)]
    _check_against_reference(got, want, ("dx", "dweight", "dbias"))
    _check_start_taps(got[1], plants, width)
