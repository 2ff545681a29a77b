"""`causal_conv1d`, `causal_conv1d_fn` and `causal_conv1d_fwd` (docs/CONTRACT.md sections 3.1-3.3) against the
float64 oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import causal_conv1d_mps as ccmps
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


def _run_and_check(x, weight, bias, initial_states, activation, seq_idx=None, name=""):
    """Forward + backward (a gradient on out and, with states, on final_states) vs the oracle."""
    dtype = x.dtype
    xg, wg, bg, sg = leaf(x), leaf(weight), leaf(bias), leaf(initial_states)
    out, final = ccmps.causal_conv1d(
        xg, wg, bg, activation, seq_idx=seq_idx, initial_states=sg, return_final_states=True
    )
    gen = seeded(7)
    dout = randn(*out.shape, dtype=dtype, device=x.device, generator=gen)
    dfinal = randn(*final.shape, dtype=dtype, device=x.device, generator=gen)
    torch.autograd.backward([out, final], [dout, dfinal])

    x64, w64, b64, s64 = leaf64(x), leaf64(weight), leaf64(bias), leaf64(initial_states)
    seq_idx_cpu = None if seq_idx is None else seq_idx.cpu()
    ref_out, ref_final = oracle.causal_conv1d(x64, w64, b64, activation, seq_idx=seq_idx_cpu, initial_states=s64)
    ref_grads = oracle_grads([ref_out, ref_final], [dout, dfinal], [x64, w64, b64, s64])

    assert out.dtype == dtype and final.dtype == dtype, f"{name}: out {out.dtype}, final {final.dtype}, x {dtype}"
    assert_close_rel(out, ref_out, dtype, f"{name} out")
    assert_close_rel(final, ref_final, dtype, f"{name} final_states")
    for label, got, ref, inp in zip(("dx", "dweight", "dbias", "dinitial_states"), (xg, wg, bg, sg), ref_grads,
                                    (x, weight, bias, initial_states)):
        if inp is None:
            continue
        assert got.grad is not None, f"{name} {label}: no gradient"
        assert got.grad.dtype == inp.dtype, f"{name} {label}: dtype {got.grad.dtype}, expected {inp.dtype}"
        assert_close_rel(got.grad, ref, dtype, f"{name} {label}")


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("weight_fp32", [False, True], ids=["w_same", "w_fp32"])
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
def test_forward_backward_matches_oracle(backend, device, dtype, weight_fp32, width):
    """dtype x weight dtype x width; the shapes vary bias, initial states and activation between them."""
    gen = seeded(width)
    wdtype = torch.float32 if weight_fp32 else dtype
    case = width + X_DTYPES.index(dtype) + 3 * weight_fp32
    for i, (b, d, t) in shapes_for_case(backend, device, case):
        activation = "silu" if (i + width) % 2 == 0 else None
        x = randn(b, d, t, dtype=dtype, device=device, generator=gen)
        weight, bias = make_params(d, width, wdtype, device, gen, with_bias=i % 3 != 2)
        states = randn(b, d, width - 1, dtype=dtype, device=device, generator=gen) if (i + width) % 3 != 1 else None
        _run_and_check(x, weight, bias, states, activation,
                       name=f"B{b} D{d} T{t} W{width} {activation} states={states is not None}")


def test_oracle_agrees_with_conv1d():
    """The oracle itself against a structurally different definition (F.conv1d)."""
    gen = seeded(1)
    x = randn(2, 7, 37, dtype=torch.float64, generator=gen)
    weight, bias = make_params(7, 5, torch.float64, "cpu", gen)
    out, _ = oracle.causal_conv1d(x, weight, bias)
    assert_close_rel(out, oracle.conv1d_reference_check(x, weight, bias), torch.float64, "oracle")


@pytest.mark.parametrize("width", [1, 4, 7])
def test_channel_last_input_keeps_layout(backend, device, width):
    """A `(B, T, D)` buffer viewed as `(B, D, T)` is read in place and `out` keeps that layout."""
    gen = seeded(2)
    b, d, t = (2, 33, 17) if uses_small_shapes(backend, device) else (2, 33, 67)
    x_btd = randn(b, t, d, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    x_leaf = leaf(x_btd)
    x = x_leaf.transpose(1, 2)  # no .contiguous(): the op must take the view as it is
    assert x.stride(1) == 1
    out = ccmps.causal_conv1d(x, weight, bias, "silu")
    assert out.stride() == x.stride(), f"out strides {out.stride()}, channel-last x strides {x.stride()}"
    dout = randn(b, d, t, device=device, generator=gen)
    out.backward(dout)

    x64 = leaf64(x_btd)
    ref, _ = oracle.causal_conv1d(x64.transpose(1, 2), weight, bias, "silu")
    (ref_dx,) = oracle_grads([ref], [dout], [x64])
    assert_close_rel(out, ref, torch.float32, "out")
    assert_close_rel(x_leaf.grad, ref_dx, torch.float32, "dx")


@pytest.mark.parametrize("width", [1, 4, 5])
@pytest.mark.parametrize("channel_last", [False, True], ids=["contiguous", "channel_last"])
def test_rows_spanning_many_full_tiles(backend, device, width, channel_last):
    """T = 200, D = 8: several whole T tiles with their halo inside x, where kernels take their
    unmasked interior paths (forward and backward), besides the edge tiles."""
    gen = seeded(5 + width)
    b, d, t = 1, 8, 200
    x_src = randn(b, t, d, device=device, generator=gen) if channel_last else randn(b, d, t, device=device,
                                                                                     generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    xg, wg, bg = leaf(x_src), leaf(weight), leaf(bias)
    out = ccmps.causal_conv1d(xg.transpose(1, 2) if channel_last else xg, wg, bg, "silu")
    dout = randn(b, d, t, device=device, generator=gen)
    out.backward(dout)

    x64, w64, b64 = leaf64(x_src), leaf64(weight), leaf64(bias)
    ref, _ = oracle.causal_conv1d(x64.transpose(1, 2) if channel_last else x64, w64, b64, "silu")
    ref_grads = oracle_grads([ref], [dout], [x64, w64, b64])
    assert_close_rel(out, ref, torch.float32, "out")
    for label, got, want in zip(("dx", "dweight", "dbias"), (xg.grad, wg.grad, bg.grad), ref_grads):
        assert_close_rel(got, want, torch.float32, label)


def test_channel_last_with_states_and_seq_idx(backend, device):
    gen = seeded(3)
    b, d, t, width = 2, 5, 17, 4
    x = randn(b, t, d, device=device, generator=gen).transpose(1, 2)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    states = randn(b, d, width - 1, device=device, generator=gen)
    seq_idx = torch.tensor([[0] * 6 + [1] * 9 + [-1] * 2, [3] * 17], dtype=torch.int32, device=device)
    _run_and_check(x, weight, bias, states, "silu", seq_idx=seq_idx, name="channel-last seq_idx")


def test_strided_input_is_accepted(backend, device):
    """A slice of a wider tensor (neither layout) works; values match the oracle."""
    gen = seeded(4)
    t = 17 if uses_small_shapes(backend, device) else 67
    wide = randn(3, 40, 2 * t, device=device, generator=gen)
    x = wide[:, 3:36, ::2]
    weight, bias = make_params(33, 4, torch.float32, device, gen)
    _run_and_check(x, weight, bias, None, None, name="strided")


@pytest.mark.parametrize("width", [2, 4, 5])
def test_seq_idx_with_padding(backend, device, width):
    gen = seeded(5)
    b, d, t = 3, 5, 23
    x = randn(b, d, t, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    states = randn(b, d, width - 1, device=device, generator=gen)
    rows = [
        [0] * 4 + [1] * 1 + [2] * 10 + [-1] * 8,  # padding at the end
        [-1] * 3 + [5] * 20,  # padding at the start: the initial states belong to -1, never used
        [7] * 2 + [8] * 2 + [9] * 2 + [10] * 17,  # sequences shorter than W
    ]
    seq_idx = torch.tensor(rows, dtype=torch.int32, device=device)
    _run_and_check(x, weight, bias, states, "silu", seq_idx=seq_idx, name="seq_idx")
    out = ccmps.causal_conv1d(x, weight, bias, "silu", seq_idx=seq_idx)
    assert (out[seq_idx[:, None, :].expand_as(out) < 0] == 0).all(), "padding positions must output 0"


@pytest.mark.parametrize("t", [1, 2, 9])
def test_final_states_out_written_in_place(backend, device, t):
    """`final_states_out` is filled and returned (including T < W-1, where it takes initial states)."""
    gen = seeded(6)
    b, d, width = 2, 5, 4
    x = randn(b, d, t, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    states = randn(b, d, width - 1, device=device, generator=gen)
    buffer = torch.full((b, d, width - 1), float("nan"), device=device)
    out, final = ccmps.causal_conv1d(
        x, weight, bias, None, initial_states=states, return_final_states=True, final_states_out=buffer
    )
    assert final is buffer, "final_states_out must be the returned final states"
    ref_out, ref_final = oracle.causal_conv1d(x.cpu(), weight.cpu(), bias.cpu(), None, initial_states=states.cpu())
    assert_close_rel(out, ref_out, torch.float32, "out")
    assert torch.equal(buffer.cpu(), ref_final.float()), "final states are copies of inputs: exact"


@pytest.mark.parametrize("shape", [(0, 5, 9), (2, 5, 0), (0, 5, 0)], ids=["B0", "T0", "B0T0"])
def test_empty_batch_or_sequence(backend, device, shape):
    gen = seeded(8)
    b, d, t = shape
    width = 4
    x = leaf(randn(b, d, t, device=device, generator=gen))
    weight, bias = make_params(d, width, torch.float32, device, gen)
    weight, bias = leaf(weight), leaf(bias)
    states = leaf(randn(b, d, width - 1, device=device, generator=gen))
    out, final = ccmps.causal_conv1d(x, weight, bias, "silu", initial_states=states, return_final_states=True)
    assert out.shape == (b, d, t) and final.shape == (b, d, width - 1)
    assert torch.equal(final.detach(), states.detach()), "T == 0: the final states are the initial states"
    (out.sum() + final.sum()).backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)), "no positions: dweight is 0"
    assert torch.equal(bias.grad, torch.zeros_like(bias)), "no positions: dbias is 0"
    assert torch.equal(states.grad, torch.ones_like(states)), "d final / d initial is the identity at T == 0"


def test_nan_propagates_to_the_taps_that_read_it(backend, device):
    b, d, t, width = 1, 5, 17, 4
    gen = seeded(9)
    x = randn(b, d, t, device=device, generator=gen)
    x[0, 2, 6] = float("nan")
    weight, bias = make_params(d, width, torch.float32, device, gen)
    out = ccmps.causal_conv1d(x, weight, bias).cpu()
    nan_positions = torch.isnan(out).nonzero().tolist()
    assert nan_positions == [[0, 2, s] for s in range(6, 6 + width)], f"NaN found at {nan_positions}"


def _grads_vs_oracle(x, weight, bias, states, seq_idx, dout, name):
    """Forward and backward through the backend and the oracle; returns (backend results, oracle results),
    each `[out, dx, dweight, dbias, dinitial_states]`."""
    xg, wg, bg, sg = leaf(x), leaf(weight), leaf(bias), leaf(states)
    out = ccmps.causal_conv1d(xg, wg, bg, "silu", seq_idx=seq_idx, initial_states=sg)
    out.backward(dout)
    x64, w64, b64, s64 = leaf64(x), leaf64(weight), leaf64(bias), leaf64(states)
    ref_out, _ = oracle.causal_conv1d(x64, w64, b64, "silu", seq_idx=seq_idx.cpu(), initial_states=s64)
    ref = [ref_out, *oracle_grads([ref_out], [dout], [x64, w64, b64, s64])]
    got = [out, xg.grad, wg.grad, bg.grad, sg.grad]
    for label, g, r in zip(("out", "dx", "dweight", "dbias", "dinitial_states"), got, ref):
        assert_close_nonfinite(g, r, torch.float32, f"{name} {label}")
    return got, ref


NAN_ROWS = [
    [0] * 5 + [1] * 6 + [-1] * 3 + [2] * 5,  # NaN planted in sequence 1 (channel 0), Inf in padding
    [-1] * 4 + [3] * 15,                     # padding first: the row's initial states belong to padding
]


def test_nan_in_one_packed_sequence_stays_in_it(backend, device):
    """NaN in sequence 1 (channel 0) and Inf in padding: sequences 0 and 2 stay finite and exact, padding
    outputs 0, forward and backward; only channel 0 of dweight/dbias may turn NaN."""
    gen = seeded(11)
    b, d, t, width = 2, 3, 19, 4
    x = randn(b, d, t, device=device, generator=gen)
    x[0, 0, 7] = float("nan")       # inside sequence 1
    x[0, 1, 12] = float("inf")      # padding
    x[1, 2, 1] = float("-inf")      # padding
    weight, bias = make_params(d, width, torch.float32, device, gen)
    states = randn(b, d, width - 1, device=device, generator=gen)
    states[1, :, 0] = float("nan")  # row 1's states belong to its padding (position 0)
    seq_idx = torch.tensor(NAN_ROWS, dtype=torch.int32, device=device)
    dout = randn(b, d, t, device=device, generator=gen)
    dout[0, 2, 11] = float("nan")   # dout at a padding position never flows back
    (out, dx, dweight, dbias, dstates), _ = _grads_vs_oracle(x, weight, bias, states, seq_idx, dout, "nan")
    seq = seq_idx.cpu()
    out, dx = out.detach().cpu(), dx.cpu()
    outside = (seq != 1)[:, None, :].expand_as(out).clone()
    outside[0, 1:] = True  # channels 1 and 2 hold no NaN at all
    assert torch.isfinite(out[outside]).all(), "a NaN/Inf reached another sequence or padding"
    assert (out[(seq < 0)[:, None, :].expand_as(out)] == 0).all(), "padding outputs must be exactly 0"
    assert torch.isfinite(dx[outside]).all() and (dx[(seq < 0)[:, None, :].expand_as(dx)] == 0).all()
    assert torch.isfinite(dweight[1:]).all() and torch.isfinite(dbias[1:]).all()
    assert torch.isfinite(dstates).all() and (dstates[1] == 0).all(), "states of padding get no gradient"


def test_nan_only_outside_every_sequence_changes_nothing(backend, device):
    """NaN/Inf only in padding (x, dout, the initial states of a row that starts with padding): every
    result is finite and equals the result with zeros planted there."""
    gen = seeded(12)
    b, d, t, width = 2, 3, 19, 4
    x = randn(b, d, t, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    states = randn(b, d, width - 1, device=device, generator=gen)
    seq_idx = torch.tensor(NAN_ROWS, dtype=torch.int32, device=device)
    dout = randn(b, d, t, device=device, generator=gen)
    pad = (seq_idx < 0)[:, None, :].expand(b, d, t)
    x = torch.where(pad, float("nan"), x)
    x[1, 0, 2] = float("inf")
    dout = torch.where(pad, float("nan"), dout)
    states[1] = float("nan")
    got, _ = _grads_vs_oracle(x, weight, bias, states, seq_idx, dout, "padding nan")
    for label, g in zip(("out", "dx", "dweight", "dbias"), got[:4]):
        assert torch.isfinite(g).all(), f"{label}: NaN/Inf from padding leaked"
    assert torch.isfinite(got[4][0]).all() and (got[4][1] == 0).all(), "dinitial_states"


def test_seq_idx_ids_beyond_int32_stay_distinct(backend, device):
    """int64 ids 0 and 2**32 are two sequences (truncated to int32 they would be one); 2**31 is an id too."""
    gen = seeded(13)
    b, d, t, width = 1, 3, 12, 4
    x = randn(b, d, t, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    seq_idx = torch.tensor([[0] * 4 + [2**32] * 4 + [2**31] * 4], dtype=torch.int64, device=device)
    out = ccmps.causal_conv1d(x, weight, bias, "silu", seq_idx=seq_idx)
    ref, _ = oracle.causal_conv1d(x.cpu(), weight.cpu(), bias.cpu(), "silu", seq_idx=seq_idx.cpu())
    assert_close_rel(out, ref, torch.float32, "out")
    xg, wg = leaf(x), leaf(weight)
    ccmps.causal_conv1d(xg, wg, None, None, seq_idx=seq_idx).square().sum().backward()
    x64, w64 = leaf64(x), leaf64(weight)
    ref_out, _ = oracle.causal_conv1d(x64, w64, None, None, seq_idx=seq_idx.cpu())
    ref_dx, ref_dw = torch.autograd.grad(ref_out.square().sum(), [x64, w64])
    assert_close_rel(xg.grad, ref_dx, torch.float32, "dx")
    assert_close_rel(wg.grad, ref_dw, torch.float32, "dweight")


@pytest.mark.parametrize("t", [6, 300], ids=["T6", "T300"])
def test_very_wide_filter(backend, device, t):
    """W = 257 (wider than any unrolled kernel loop is tuned for), shorter and longer than the filter,
    with initial states and gradients: correct, and quick enough under the Triton interpreter (the
    initial-state gradient once took 344 s at T = 6)."""
    if t == 300 and uses_small_shapes(backend, device):
        pytest.skip("T = 300 with W = 257 is covered on the reference path and on GPUs")
    gen = seeded(14)
    b, d, width = 1, 3, 257
    x = randn(b, d, t, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    states = randn(b, d, width - 1, device=device, generator=gen)
    _run_and_check(x, weight, bias, states, "silu", name=f"W257 T{t}")


def test_swish_is_silu(backend, device):
    gen = seeded(10)
    x = randn(2, 5, 17, device=device, generator=gen)
    weight, bias = make_params(5, 4, torch.float32, device, gen)
    assert torch.equal(ccmps.causal_conv1d(x, weight, bias, "swish"), ccmps.causal_conv1d(x, weight, bias, "silu"))


def test_causal_conv1d_fn_takes_dao_positional_order(backend, device):
    """Dao's order: (x, weight, bias, seq_idx, initial_states, return_final_states, final_states_out, activation)."""
    gen = seeded(11)
    b, d, t, width = 2, 5, 17, 4
    x = randn(b, d, t, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    states = randn(b, d, width - 1, device=device, generator=gen)
    seq_idx = torch.zeros(b, t, dtype=torch.int32, device=device)
    out, final = ccmps.causal_conv1d_fn(x, weight, bias, seq_idx, states, True, None, "silu")
    ref_out, ref_final = oracle.causal_conv1d(x.cpu(), weight.cpu(), bias.cpu(), "silu", initial_states=states.cpu())
    assert_close_rel(out, ref_out, torch.float32, "out")
    assert_close_rel(final, ref_final, torch.float32, "final_states")
    only_out = ccmps.causal_conv1d_fn(x, weight, bias, activation="silu")
    assert isinstance(only_out, torch.Tensor)


@pytest.mark.parametrize("silu", [False, True])
def test_causal_conv1d_fwd_records_no_graph(backend, device, silu):
    gen = seeded(12)
    x = leaf(randn(2, 5, 17, device=device, generator=gen))
    weight, bias = make_params(5, 3, torch.float32, device, gen)
    out = ccmps.causal_conv1d_fwd(x, leaf(weight), leaf(bias), silu)
    assert not out.requires_grad and out.grad_fn is None
    ref, _ = oracle.causal_conv1d(x.detach().cpu(), weight.cpu(), bias.cpu(), "silu" if silu else None)
    assert_close_rel(out, ref, torch.float32, "out")


def test_backward_is_deterministic(backend, device):
    gen = seeded(13)
    # T = 130 spans several time blocks, so the dweight/dbias partial sums are reduced across blocks.
    b, d, t, width = (2, 5, 130, 4) if uses_small_shapes(backend, device) else (3, 33, 130, 4)
    x = randn(b, d, t, dtype=torch.bfloat16, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    states = randn(b, d, width - 1, dtype=torch.bfloat16, device=device, generator=gen)
    dout = randn(b, d, t, dtype=torch.bfloat16, device=device, generator=gen)

    def grads():
        leaves = [leaf(v) for v in (x, weight, bias, states)]
        out = ccmps.causal_conv1d(leaves[0], leaves[1], leaves[2], "silu", initial_states=leaves[3])
        out.backward(dout)
        return [v.grad for v in leaves]

    for name, first, second in zip(("dx", "dweight", "dbias", "dinitial_states"), grads(), grads()):
        assert torch.equal(first, second), f"{name} differs between two identical backward runs"


def _random_seq_idx(b: int, t: int, n_breaks: int, gen, device):
    """`[B, T]` int32 sequence ids that step up at `n_breaks` random positions per row (None without breaks)."""
    if not (n_breaks and t and b):
        return None
    breaks = torch.randint(0, t, (b, n_breaks), generator=gen)
    return (torch.arange(t)[None, :, None] >= breaks[:, None, :]).sum(2).to(torch.int32).to(device)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(0, 3),
    d=st.integers(1, 9),
    t=st.integers(0, 40),
    width=st.integers(1, 9),
    silu=st.booleans(),
    use_states=st.booleans(),
    n_breaks=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_property_reference_matches_oracle(monkeypatch, b, d, t, width, silu, use_states, n_breaks, seed):
    """Random shapes, states and packed sequences: the reference path equals the oracle."""
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "reference")
    gen = seeded(seed)
    x = randn(b, d, t, dtype=torch.float64, generator=gen)
    weight, bias = make_params(d, width, torch.float64, "cpu", gen)
    states = randn(b, d, width - 1, dtype=torch.float64, generator=gen) if use_states else None
    seq_idx = _random_seq_idx(b, t, n_breaks, gen, "cpu")
    _run_and_check(x, weight, bias, states, "silu" if silu else None, seq_idx=seq_idx, name="property")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 2),
    d=st.integers(1, 40),
    t=st.integers(0, 70),
    width=st.integers(1, 19),
    silu=st.booleans(),
    use_states=st.booleans(),
    channel_last=st.booleans(),
    n_breaks=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_property_every_backend_matches_oracle(backend, device, b, d, t, width, silu, use_states, channel_last,
                                               n_breaks, seed):
    """Random float32 shapes (widths past the unrolled 16 too), layouts, states and packed sequences through
    each backend's kernels: outputs and gradients equal the oracle."""
    gen = seeded(seed)
    x = randn(b, t, d, device=device, generator=gen).transpose(1, 2) if channel_last \
        else randn(b, d, t, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    states = randn(b, d, width - 1, device=device, generator=gen) if use_states else None
    seq_idx = _random_seq_idx(b, t, n_breaks, gen, device)
    _run_and_check(x, weight, bias, states, "silu" if silu else None, seq_idx=seq_idx, name="property")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_weights_are_not_rounded_to_x_dtype(backend, device, dtype):
    """docs/CONTRACT.md section 2: with taps (-1, 1 + 2**-12) over a constant 1, the output is 2**-12 (exact in
    `dtype`);
    weights rounded to fp16/bf16 first would give 0."""
    b, d, t = 2, 3, 5
    x = torch.ones(b, d, t, dtype=dtype, device=device)
    weight = torch.tensor([[-1.0, 1.0 + 2.0**-12]] * d, device=device)
    out = ccmps.causal_conv1d(x, weight)
    expected = torch.full((b, d, t), 2.0**-12, dtype=torch.float64)
    expected[..., 0] = 1.0 + 2.0**-12  # zero history before t = 0
    assert_close_rel(out[..., 1:], expected[..., 1:], dtype, "out")
