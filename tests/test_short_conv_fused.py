"""`short_conv_fused` and `short_conv_fused_fwd_only` (docs/CONTRACT.md sections 3.4-3.5) against the float64 oracle."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import causal_conv1d_mps as ccmps
from causal_conv1d_mps._activation import SILU
import oracle
from conftest import (
    WIDTHS,
    X_DTYPES,
    assert_close_nonfinite,
    assert_close_rel,
    leaf,
    leaf64,
    make_params,
    oracle_grads,
    randn,
    seeded,
    shapes_for_case,
    uses_small_shapes,
)

MODES = {"silu+residual": (True, True), "silu": (True, False), "plain+residual": (False, True), "plain": (False, False)}


def _run_and_check(x, weight, bias, mask, states, activation, residual, cu_seqlens=None, name="", x_source=None):
    """Forward + backward (gradients on out and final states) against the oracle.

    `x_source`, when given, is the leaf `x` was sliced from (a wider projection); `x` is then
    used as it is and the gradient is checked on the source.
    """
    dtype = x.dtype
    if x_source is None:
        x_source = x
        slicer = lambda t: t  # noqa: E731
    else:
        slicer = _slicer_of(x_source, x)
    src, wg, bg, sg = leaf(x_source), leaf(weight), leaf(bias), leaf(states)
    out, final = ccmps.short_conv_fused(
        slicer(src), wg, bg, mask, activation, residual,
        initial_states=sg, return_final_states=True, cu_seqlens=cu_seqlens,
    )
    assert out.is_contiguous(), f"{name}: out strides {out.stride()}, expected a new contiguous tensor"
    gen = seeded(17)
    dout = randn(*out.shape, dtype=dtype, device=x.device, generator=gen)
    dfinal = randn(*final.shape, dtype=dtype, device=x.device, generator=gen)
    torch.autograd.backward([out, final], [dout, dfinal])

    src64, w64, b64, s64 = leaf64(x_source), leaf64(weight), leaf64(bias), leaf64(states)
    ref_out, ref_final = oracle.short_conv_fused(
        slicer(src64), w64, b64, None if mask is None else mask.cpu(), activation, residual,
        initial_states=s64, cu_seqlens=None if cu_seqlens is None else cu_seqlens.cpu(),
    )
    ref_grads = oracle_grads([ref_out, ref_final], [dout, dfinal], [src64, w64, b64, s64])
    assert out.dtype == dtype and final.dtype == dtype, f"{name}: out {out.dtype}, final {final.dtype}, x {dtype}"
    assert_close_rel(out, ref_out, dtype, f"{name} out")
    assert_close_rel(final, ref_final, dtype, f"{name} final_states")
    for label, got, ref in zip(("dx", "dweight", "dbias", "dinitial_states"), (src, wg, bg, sg), ref_grads):
        if got is None:
            continue
        assert got.grad is not None, f"{name} {label}: no gradient"
        assert got.grad.dtype == got.dtype, f"{name} {label}: dtype {got.grad.dtype}, expected {got.dtype}"
        assert_close_rel(got.grad, ref, dtype, f"{name} {label}")
    return out, final


def _slicer_of(source: torch.Tensor, view: torch.Tensor):
    """A function that takes the same strided view of another tensor shaped like `source`."""
    offset = view.storage_offset() - source.storage_offset()
    size, stride = view.shape, view.stride()
    base_stride = source.stride()
    assert base_stride == source.contiguous().stride(), "the source of a slice must be contiguous"

    def slicer(t):
        return t.contiguous().as_strided(size, stride, t.contiguous().storage_offset() + offset)

    return slicer


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("weight_fp32", [False, True], ids=["w_same", "w_fp32"])
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
def test_forward_backward_matches_oracle(backend, device, dtype, weight_fp32, width):
    """dtype x weight dtype x width; the shapes vary activation/residual, bias, mask and states."""
    gen = seeded(100 + width)
    wdtype = torch.float32 if weight_fp32 else dtype
    case = width + X_DTYPES.index(dtype) + 3 * weight_fp32
    modes = list(MODES)
    for i, (b, d, t) in shapes_for_case(backend, device, case):
        mode = modes[(i + case // 4) % len(modes)]
        activation, residual = MODES[mode]
        x = randn(b, t, d, dtype=dtype, device=device, generator=gen)
        weight, bias = make_params(d, width, wdtype, device, gen, with_bias=i % 3 != 2)
        states = randn(b, d, width - 1, dtype=dtype, device=device, generator=gen) if (i + width) % 2 == 0 else None
        mask = (torch.rand(b, t, generator=gen) > 0.3).to(device) if (i + case) % 3 != 1 else None
        _run_and_check(x, weight, bias, mask, states, activation, residual,
                       name=f"B{b} T{t} D{d} W{width} {mode} mask={mask is not None} states={states is not None}")


@pytest.mark.parametrize("width", [1, 4, 5])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
def test_rows_spanning_many_full_tiles(backend, device, width, with_mask):
    """T = 200, D = 64: several whole T tiles with their halo inside x, where kernels take their
    unmasked interior paths (forward and backward), besides the edge tiles."""
    gen = seeded(7 + width)
    b, t, d = 1, 200, 64
    x = randn(b, t, d, dtype=torch.float32, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    mask = (torch.rand(b, t, generator=gen) > 0.3).to(device) if with_mask else None
    _run_and_check(x, weight, bias, mask, None, True, True, name=f"T{t} D{d} W{width} mask={with_mask}")


@pytest.mark.parametrize("layout", ["columns", "columns+every_other_step"])
def test_reads_a_strided_slice_of_a_wider_projection(backend, device, layout):
    """`x = proj[..., D:2D]` (stride over T is 3D) is read in place; dx lands in that slice only."""
    gen = seeded(18)
    b, t, d, width = 2, 17, 5, 4
    steps = 2 * t if layout != "columns" else t
    proj = randn(b, steps, 3 * d, device=device, generator=gen)
    x = proj[:, ::2, d : 2 * d] if layout != "columns" else proj[..., d : 2 * d]
    assert x.stride(2) == 1 and not x.is_contiguous()
    weight, bias = make_params(d, width, torch.float32, device, gen)
    mask = torch.rand(b, t, generator=gen).to(device)
    states = randn(b, d, width - 1, device=device, generator=gen)
    _run_and_check(x, weight, bias, mask, states, True, True, name=layout, x_source=proj)


# Each accepted mask form, built for (B, T), with the `(B, T)` multiplier it means (docs/CONTRACT.md section 2.6).
def _mask_cases():
    b, t = 3, 5
    g = seeded(19)
    full = (torch.rand(b, t, generator=g) > 0.4).to(torch.float32)
    row = (torch.rand(1, t, generator=g) > 0.4).to(torch.float32)
    col = torch.tensor([[1.0], [0.0], [1.0]])
    frac = torch.rand(b, t, generator=g)
    longer = (torch.rand(b, t + 4, generator=g) > 0.4).to(torch.float32)
    square = (torch.rand(4, 4, generator=g) > 0.5).to(torch.float32)
    square[0, 0], square[0, 1] = 1.0, 0.0  # not symmetric: a transpose would be caught
    return {
        "BT_bool": (b, t, full.bool(), full),
        "BT_int64": (b, t, full.long(), full),
        "BT_int32": (b, t, full.int(), full),
        "BT_float": (b, t, frac, frac),
        "1T": (b, t, row.bool(), row.expand(b, t)),
        "B1": (b, t, col.bool(), col.expand(b, t)),
        "TB": (b, t, full.t().contiguous().bool(), full),
        "1d_T": (b, t, row[0].bool(), row.expand(b, t)),
        "1d_B": (b, t, col[:, 0].bool(), col.expand(b, t)),
        "1d_BT": (b, t, full.reshape(-1).bool(), full),
        "square_is_BT": (4, 4, square.bool(), square),
        "more_columns_keeps_last_T": (b, t, longer.bool(), longer[:, 4:]),
        "1_more_columns": (b, t, longer[:1].bool(), longer[:1, 4:].expand(b, t)),
        # T == 1: a (1, B) mask is the listed (T, B) form, not a (1, T) mask with extra columns.
        "TB_when_T_is_1": (b, 1, col.t().contiguous(), col),
    }


MASK_CASES = _mask_cases()


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_accepted_mask_forms(backend, device, case):
    b, t, mask, meaning = MASK_CASES[case]
    gen = seeded(20)
    d, width = 5, 3
    x = randn(b, t, d, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    out, final = ccmps.short_conv_fused(x, weight, bias, mask.to(device), True, True, return_final_states=True)
    # The meaning is given by hand here, so the oracle's own normalisation is not what is tested.
    ref_out, ref_final = oracle.short_conv_fused(x.cpu(), weight.cpu(), bias.cpu(), meaning, True, True)
    assert_close_rel(out, ref_out, torch.float32, f"{case} out")
    assert_close_rel(final, ref_final, torch.float32, f"{case} final_states")
    assert torch.equal(oracle.normalise_mask(mask, b, t), meaning.double()), f"{case}: oracle disagrees with test"


@pytest.mark.parametrize(
    "mask_shape", [(4, 5), (3, 4), (2, 3, 5), (7,), (5, 2), (0,)], ids=lambda s: "x".join(map(str, s)) or "0"
)
def test_rejected_mask_forms(backend, device, mask_shape):
    """B = 3, T = 5: these shapes cannot be normalised; the message names them and the accepted forms."""
    x = torch.randn(3, 5, 4, device=device)
    weight = torch.randn(4, 3, device=device)
    mask = torch.ones(mask_shape, device=device)
    with pytest.raises(ValueError) as info:
        ccmps.short_conv_fused(x, weight, None, mask)
    message = str(info.value)
    dims = r",\s*".join(map(str, mask_shape))
    assert "attention_mask" in message, f"message does not name attention_mask: {message}"
    assert re.search(rf"[\(\[]{dims},?[\)\]]", message), f"message does not state the shape {mask_shape}: {message}"
    assert re.search(r"[\(\[]B,\s*T[\)\]]", message), f"message does not list the accepted forms: {message}"


@pytest.mark.parametrize("width", [1, 2, 4, 6])
@pytest.mark.parametrize("with_states", [False, True], ids=["zeros", "states"])
def test_cu_seqlens_equals_a_loop_over_sequences(backend, device, width, with_states):
    """Packed sequences (some empty, some shorter than W) == each sequence convolved alone."""
    gen = seeded(21)
    d = 5
    bounds = [0, 0, 7, 8, 8, 25, 27, 40]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    n, t = len(bounds) - 1, bounds[-1]
    x = randn(1, t, d, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    states = randn(n, d, width - 1, device=device, generator=gen) if with_states else None
    mask = (torch.rand(1, t, generator=gen) > 0.2).to(device)
    out, final = _run_and_check(x, weight, bias, mask, states, True, True, cu_seqlens=cu, name="varlen")
    assert final.shape == (n, d, width - 1)
    for i in range(n):
        start, end = bounds[i], bounds[i + 1]
        init = None if states is None else states[i : i + 1]
        alone, alone_final = ccmps.short_conv_fused(
            x[:, start:end], weight, bias, mask[:, start:end], True, True, initial_states=init, return_final_states=True
        )
        assert_close_rel(out[:, start:end], alone.to(torch.float64), torch.float32, f"sequence {i} out")
        assert_close_rel(final[i : i + 1], alone_final.to(torch.float64), torch.float32, f"sequence {i} final")


def test_cu_seqlens_int64_accepted(backend, device):
    gen = seeded(22)
    x = randn(1, 9, 5, device=device, generator=gen)
    weight, bias = make_params(5, 4, torch.float32, device, gen)
    cu32 = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    out32 = ccmps.short_conv_fused(x, weight, bias, cu_seqlens=cu32)
    out64 = ccmps.short_conv_fused(x, weight, bias, cu_seqlens=cu32.long())
    assert torch.equal(out32, out64)


@pytest.mark.parametrize("split", [1, 2, 9])
def test_chunked_prefill_continues_the_stream(backend, device, split):
    """Final states of chunk 1 as initial states of chunk 2 == one call (with a mask)."""
    gen = seeded(23)
    b, t, d, width = 2, 17, 5, 4
    x = randn(b, t, d, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    mask = (torch.rand(b, t, generator=gen) > 0.3).to(device)
    whole = ccmps.short_conv_fused(x, weight, bias, mask)
    first, carry = ccmps.short_conv_fused(x[:, :split], weight, bias, mask[:, :split], return_final_states=True)
    second = ccmps.short_conv_fused(x[:, split:], weight, bias, mask[:, split:], initial_states=carry)
    assert_close_rel(torch.cat([first, second], 1), whole.to(torch.float64), torch.float32, "chunked")


@pytest.mark.parametrize("shape", [(0, 9, 5), (2, 0, 5)], ids=["B0", "T0"])
def test_empty_batch_or_sequence(backend, device, shape):
    b, t, d = shape
    width = 4
    x = leaf(torch.randn(b, t, d, device=device))
    weight, bias = leaf(torch.randn(d, width, device=device)), leaf(torch.randn(d, device=device))
    states = leaf(torch.randn(b, d, width - 1, device=device))
    out, final = ccmps.short_conv_fused(x, weight, bias, initial_states=states, return_final_states=True)
    assert out.shape == (b, t, d) and final.shape == (b, d, width - 1)
    assert torch.equal(final.detach(), states.detach())
    (out.sum() + final.sum()).backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


def test_all_sequences_empty(backend, device):
    x = torch.randn(1, 0, 5, device=device)
    weight = torch.randn(5, 3, device=device)
    cu = torch.zeros(4, dtype=torch.int32, device=device)
    states = torch.randn(3, 5, 2, device=device)
    out, final = ccmps.short_conv_fused(x, weight, None, initial_states=states, return_final_states=True, cu_seqlens=cu)
    assert out.shape == (1, 0, 5)
    assert torch.equal(final, states), "empty sequences keep their initial states"


def test_fwd_only_records_no_graph(backend, device):
    gen = seeded(24)
    x = leaf(randn(2, 17, 5, device=device, generator=gen))
    weight, bias = make_params(5, 4, torch.float32, device, gen)
    mask = torch.ones(2, 17, dtype=torch.bool, device=device)
    out, final = ccmps.short_conv_fused_fwd_only(x, leaf(weight), leaf(bias), mask, True, True, return_final_states=True)
    assert not out.requires_grad and out.grad_fn is None
    ref, ref_final = oracle.short_conv_fused(x.detach().cpu(), weight.cpu(), bias.cpu(), None, True, True)
    assert_close_rel(out, ref, torch.float32, "out")
    assert_close_rel(final, ref_final, torch.float32, "final_states")


def test_backward_is_deterministic(backend, device):
    gen = seeded(25)
    # T = 130 spans several time blocks, so the dweight/dbias partial sums are reduced across blocks.
    b, t, d, width = (2, 130, 5, 4) if uses_small_shapes(backend, device) else (3, 130, 33, 4)
    x = randn(b, t, d, dtype=torch.bfloat16, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    states = randn(b, d, width - 1, dtype=torch.bfloat16, device=device, generator=gen)
    mask = torch.rand(b, t, generator=gen).to(device)
    dout = randn(b, t, d, dtype=torch.bfloat16, device=device, generator=gen)

    def grads():
        leaves = [leaf(v) for v in (x, weight, bias, states)]
        out = ccmps.short_conv_fused(leaves[0], leaves[1], leaves[2], mask, initial_states=leaves[3])
        out.backward(dout)
        return [v.grad for v in leaves]

    for name, first, second in zip(("dx", "dweight", "dbias", "dinitial_states"), grads(), grads()):
        assert torch.equal(first, second), f"{name} differs between two identical backward runs"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    d=st.integers(1, 7),
    width=st.integers(1, 8),
    activation=st.booleans(),
    residual=st.booleans(),
    use_states=st.booleans(),
    use_mask=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_reference_matches_oracle(monkeypatch, lengths, d, width, activation, residual, use_states,
                                           use_mask, seed):
    """Random packed sequences, masks and states: the reference path equals the oracle."""
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "reference")
    gen = seeded(seed)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    t = bounds[-1]
    x = randn(1, t, d, dtype=torch.float64, generator=gen)
    weight, bias = make_params(d, width, torch.float64, "cpu", gen)
    states = randn(len(lengths), d, width - 1, dtype=torch.float64, generator=gen) if use_states else None
    mask = torch.rand(1, t, generator=gen, dtype=torch.float64) if use_mask else None
    cu = torch.tensor(bounds, dtype=torch.int32)
    _run_and_check(x, weight, bias, mask, states, activation, residual, cu_seqlens=cu, name="property")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_weights_are_not_rounded_to_x_dtype(backend, device, dtype):
    """docs/CONTRACT.md section 2: taps (-1, 1 + 2**-12) over a constant 1 give 2**-12; rounded weights would give 0."""
    b, t, d = 2, 5, 3
    x = torch.ones(b, t, d, dtype=dtype, device=device)
    weight = torch.tensor([[-1.0, 1.0 + 2.0**-12]] * d, device=device)
    out = ccmps.short_conv_fused(x, weight, None, None, False, False)
    expected = torch.full((b, t - 1, d), 2.0**-12, dtype=torch.float64)
    assert_close_rel(out[:, 1:], expected, dtype, "out")


def test_no_sequences_at_all(backend, device):
    """T == 0 with cu_seqlens == [0]: zero sequences; empty output, empty states, zero weight gradients."""
    x = leaf(torch.randn(1, 0, 5, device=device))
    weight, bias = leaf(torch.randn(5, 3, device=device)), leaf(torch.randn(5, device=device))
    states = leaf(torch.randn(0, 5, 2, device=device))
    cu = torch.zeros(1, dtype=torch.int32, device=device)
    out, final = ccmps.short_conv_fused(x, weight, bias, initial_states=states, return_final_states=True,
                                        cu_seqlens=cu)
    assert out.shape == (1, 0, 5) and final.shape == (0, 5, 2)
    (out.sum() + final.sum()).backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))
    assert x.grad.shape == x.shape and states.grad.shape == states.shape


def _fused_vs_oracle(x, weight, bias, mask, states, cu, dout, dfinal, name):
    xg, wg, bg, sg = leaf(x), leaf(weight), leaf(bias), leaf(states)
    out, final = ccmps.short_conv_fused(xg, wg, bg, mask, True, True, initial_states=sg, return_final_states=True,
                                        cu_seqlens=cu)
    torch.autograd.backward([out, final], [dout, dfinal])
    x64, w64, b64, s64 = leaf64(x), leaf64(weight), leaf64(bias), leaf64(states)
    ref_out, ref_final = oracle.short_conv_fused(x64, w64, b64, None if mask is None else mask.cpu(), True, True,
                                                 initial_states=s64, cu_seqlens=None if cu is None else cu.cpu())
    ref = [ref_out, ref_final, *oracle_grads([ref_out, ref_final], [dout, dfinal], [x64, w64, b64, s64])]
    got = [out, final, xg.grad, wg.grad, bg.grad, sg.grad]
    for label, g, r in zip(("out", "final_states", "dx", "dweight", "dbias", "dinitial_states"), got, ref):
        assert_close_nonfinite(g, r, torch.float32, f"{name} {label}")
    return [t.detach().cpu() for t in got]


def test_nan_in_one_packed_sequence_stays_in_it(backend, device):
    """cu_seqlens: a NaN in sequence 1 (channel 0) and NaN initial states of the empty sequence 3 reach
    no other sequence, forward or backward (only channel 0 of dweight/dbias may turn NaN)."""
    gen = seeded(25)
    bounds = [0, 5, 11, 19, 19]
    d, width = 3, 4
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    x = randn(1, bounds[-1], d, device=device, generator=gen)
    x[0, 7, 0] = float("nan")
    weight, bias = make_params(d, width, torch.float32, device, gen)
    states = randn(len(bounds) - 1, d, width - 1, device=device, generator=gen)
    states[3] = float("nan")  # the empty sequence: its states are its final states, and nothing else
    dout = randn(1, bounds[-1], d, device=device, generator=gen)
    dfinal = randn(*states.shape, device=device, generator=gen)
    out, final, dx, dweight, dbias, dstates = _fused_vs_oracle(x, weight, bias, None, states, cu, dout, dfinal,
                                                               "varlen nan")
    others = torch.ones(bounds[-1], dtype=torch.bool)
    others[5:11] = False
    assert torch.isfinite(out[0, others]).all() and torch.isfinite(out[0, :, 1:]).all()
    assert torch.isfinite(dx[0, others]).all() and torch.isfinite(dx[0, :, 1:]).all()
    assert torch.isfinite(dweight[1:]).all() and torch.isfinite(dbias[1:]).all()
    assert torch.isfinite(final[:3]).all() and torch.isnan(final[3]).all()
    assert torch.isfinite(dstates[[0, 2, 3]]).all() and torch.isfinite(dstates[:, 1:]).all()


def test_nan_at_masked_positions_contributes_nothing(backend, device):
    """A position whose mask is 0 adds nothing to the conv even when x there is NaN/Inf: only its own
    output sees it (through the residual); final states hold 0 there; every gradient stays finite."""
    gen = seeded(26)
    b, t, d, width = 2, 11, 3, 4
    x = randn(b, t, d, device=device, generator=gen)
    mask = torch.ones(b, t, device=device)
    mask[0, 4] = 0.0
    mask[1, 10] = 0.0
    mask[1, 2] = 0.5  # a non-zero value still multiplies x
    x[0, 4, :] = float("nan")
    x[1, 10, 1] = float("inf")
    weight, bias = make_params(d, width, torch.float32, device, gen)
    states = randn(b, d, width - 1, device=device, generator=gen)
    dout = randn(b, t, d, device=device, generator=gen)
    dfinal = randn(b, d, width - 1, device=device, generator=gen)
    out, final, dx, dweight, dbias, dstates = _fused_vs_oracle(x, weight, bias, mask, states, None, dout, dfinal,
                                                               "masked nan")
    planted = ~torch.isfinite(x.cpu())
    assert torch.equal(~torch.isfinite(out), planted), "a masked NaN may appear only in its own output"
    assert torch.isfinite(final).all() and (final[1, :, -1] == 0).all(), "final states hold 0 where masked"
    for label, g in (("dx", dx), ("dweight", dweight), ("dbias", dbias), ("dinitial_states", dstates)):
        assert torch.isfinite(g).all(), f"{label}: a masked NaN leaked into the gradient"


@pytest.mark.parametrize("bounds", [[0, 9, 3, 12], [0, 30, 40], [-4, 2, 12]], ids=["decreasing", "past_T", "negative"])
def test_triton_kernels_stay_inside_x_for_unchecked_cu_seqlens(backend, device, bounds):
    """Under torch.compile cu_seqlens values are not checked: a bad one gives unspecified values but the
    Triton kernels read nothing outside the tensors they were given (NaN around x never shows up)."""
    if backend != "triton":
        pytest.skip("calls the Triton backend functions directly (the api rejects these cu_seqlens in eager mode)")
    from causal_conv1d_mps import triton as triton_backend

    gen = seeded(27)
    t, d, width = 12, 3, 4
    guard = torch.full((1, t + 40, d), float("nan"), device=device)
    x = guard[:, 20:20 + t]
    x.copy_(randn(1, t, d, device=device, generator=gen))
    weight, bias = make_params(d, width, torch.float32, device, gen)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    n = len(bounds) - 1
    states = randn(n, d, width - 1, device=device, generator=gen)
    out, final = triton_backend.short_conv_fused_fwd(x, weight, bias, None, states, cu, SILU, True, True)
    dout, dfinal = torch.ones_like(out), torch.ones_like(final)
    dx, dweight, dbias, dstates = triton_backend.short_conv_fused_bwd(x, weight, bias, None, states, cu, dout, dfinal,
                                                                      SILU, True)
    for label, result in (("out", out), ("final_states", final), ("dx", dx), ("dweight", dweight), ("dbias", dbias),
                          ("dinitial_states", dstates)):
        assert torch.isfinite(result).all(), f"{label}: read outside x"
