"""The decode step: `short_conv_update`, `short_conv_update_fwd_only`, `causal_conv1d_update` (docs/CONTRACT.md
sections 3.6-3.8).

Outputs are compared with the float64 oracle at the docs/CONTRACT.md section 6 tolerance; states bitwise (they
are copies of inputs).
"""

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
    assert_close_rel,
    assert_equal_exact,
    leaf,
    leaf64,
    make_params,
    oracle_grads,
    randn,
    seeded,
)

MODES = ("shift", "circular")


def _state_size(width: int, extra: int, mode: str) -> int:
    # A circular buffer needs at least one slot to index modulo S.
    return max(width - 1 + extra, 1 if mode == "circular" else 0)


def _cache_seqlens(batch: int, size: int, device, gen) -> torch.Tensor:
    """Positions spread over several wraps of the buffer, so `% S` is exercised."""
    return torch.randint(0, 3 * max(size, 1) + 1, (batch,), generator=gen, dtype=torch.int32).to(device)


def _check_step(x, state, weight, bias, cache_seqlens, indices, activation, residual, name):
    ref_out, ref_state = oracle.short_conv_update(
        x.cpu(), state.cpu(), weight.cpu(), None if bias is None else bias.cpu(),
        None if cache_seqlens is None else cache_seqlens.cpu(), activation, residual,
        None if indices is None else indices.cpu(),
    )
    out = ccmps.short_conv_update(x, state, weight, bias, cache_seqlens, activation, residual,
                                  conv_state_indices=indices)
    assert out.shape == x.shape and out.dtype == x.dtype, f"{name}: out {tuple(out.shape)} {out.dtype}"
    assert_close_rel(out, ref_out, x.dtype, f"{name} out")
    assert_equal_exact(state, ref_state.to(state.device), f"{name} conv_state")
    return out


LENGTHS = (None, 1, 3, 9)


@pytest.mark.parametrize("length", LENGTHS, ids=["2d", "L1", "L3", "L9"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
def test_step_matches_oracle(backend, device, dtype, width, mode, length):
    """One call with `L` tokens (`L > S` included), shift or circular, fp32 weights with low-precision x.

    The state is `S == W-1` or `S == W+2`, alternating over the matrix (each width and mode meets both).
    """
    extra = 3 * ((width + LENGTHS.index(length) + X_DTYPES.index(dtype)) % 2)
    gen = seeded(width * 10 + extra)
    b, d = 3, 5
    size = _state_size(width, extra, mode)
    shape = (b, d) if length is None else (b, length, d)
    x = randn(*shape, dtype=dtype, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    state = randn(b, d, size, dtype=dtype, device=device, generator=gen)
    seqlens = _cache_seqlens(b, size, device, gen) if mode == "circular" else None
    _check_step(x, state, weight, bias, seqlens, None, True, True, f"{mode} W{width} S{size} L{length}")


@pytest.mark.parametrize("length", [None, 1, 3], ids=["2d", "L1", "L3"])
@pytest.mark.parametrize("mode", MODES)
def test_x_read_as_a_slice_of_a_wider_projection(backend, device, mode, length):
    """`x` as columns of a wider buffer (not contiguous): read in place, `out` keeps the shape of `x`."""
    gen = seeded(31)
    b, d, width = 3, 5, 4
    size = _state_size(width, 1, mode)
    wide = randn(b, 3 * d, device=device, generator=gen) if length is None else \
        randn(b, length, 3 * d, device=device, generator=gen)
    x = wide[..., d:2 * d]
    assert not x.is_contiguous()
    weight, bias = make_params(d, width, torch.float32, device, gen)
    state = randn(b, d, size, device=device, generator=gen)
    seqlens = _cache_seqlens(b, size, device, gen) if mode == "circular" else None
    before = wide.clone()
    _check_step(x, state, weight, bias, seqlens, None, True, True, f"slice {mode} L{length}")
    assert_equal_exact(wide, before, "the projection x was sliced from")


@pytest.mark.parametrize("activation,residual", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("mode", MODES)
def test_step_flags(backend, device, mode, activation, residual):
    gen = seeded(31)
    b, d, width = 2, 33, 4
    x = randn(b, 2, d, device=device, generator=gen)
    weight, _ = make_params(d, width, torch.float32, device, gen)
    state = randn(b, d, 5, device=device, generator=gen)
    seqlens = _cache_seqlens(b, 5, device, gen) if mode == "circular" else None
    _check_step(x, state, weight, None, seqlens, None, activation, residual, f"{mode} act={activation} res={residual}")


@pytest.mark.parametrize("length", [None, 2, 7], ids=["2d", "L2", "L7"])
@pytest.mark.parametrize("mode", MODES)
def test_conv_state_indices_with_padding_slots(backend, device, mode, length):
    """Row b uses slot indices[b]; -1 rows output 0 and touch nothing; unused slots stay as they were."""
    gen = seeded(32)
    b, d, width, n_slots, size = 4, 5, 4, 6, 5
    shape = (b, d) if length is None else (b, length, d)
    x = randn(*shape, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    state = randn(n_slots, d, size, device=device, generator=gen)
    before = state.clone()
    indices = torch.tensor([4, -1, 0, 2], dtype=torch.int32, device=device)
    seqlens = _cache_seqlens(b, size, device, gen) if mode == "circular" else None
    out = _check_step(x, state, weight, bias, seqlens, indices, True, True, f"{mode} indices")
    assert (out[1] == 0).all(), "a padding slot's output row is 0 (residual included)"
    for slot in (1, 3, 5):
        assert torch.equal(state[slot], before[slot]), f"slot {slot} is not referenced and must be untouched"


@pytest.mark.parametrize("mode", MODES)
def test_out_of_range_index_is_padding_on_gpus(backend, device, mode):
    """docs/CONTRACT.md section 2.9.3: on GPUs an index >= N is not checked (that would synchronise) but must act
    as padding."""
    if device.type == "cpu":
        pytest.skip("on CPU an index >= N is rejected (tests/test_validation.py)")
    gen = seeded(39)
    b, d, width, n_slots, size = 2, 5, 4, 3, 4
    x = randn(b, d, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    state = randn(n_slots, d, size, device=device, generator=gen)
    before = state.clone()
    seqlens = _cache_seqlens(b, size, device, gen) if mode == "circular" else None
    indices = torch.tensor([1, n_slots + 5], dtype=torch.int32, device=device)
    out = ccmps.short_conv_update(x, state, weight, bias, seqlens, conv_state_indices=indices)
    assert (out[1] == 0).all(), "an out-of-range slot's output row is 0"
    assert torch.equal(state[0], before[0]) and torch.equal(state[2], before[2]), "only slot 1 may change"


@pytest.mark.parametrize(
    "layout", ["transposed", "sliced_time", "every_other_row"],
)
@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_state_updated_in_place(backend, device, mode, layout):
    """The caller's buffer is the one updated, whatever its strides (never a silent copy)."""
    gen = seeded(33)
    b, d, width, size = 3, 5, 4, 6
    if layout == "transposed":
        buffer = randn(b, size, d, device=device, generator=gen)
        state = buffer.transpose(1, 2)
    elif layout == "sliced_time":
        buffer = randn(b, d, size + 4, device=device, generator=gen)
        state = buffer[:, :, 2 : 2 + size]
    else:
        buffer = randn(2 * b, d, size, device=device, generator=gen)
        state = buffer[::2]
    assert not state.is_contiguous()
    untouched = buffer.clone()
    ptr, strides = state.data_ptr(), state.stride()
    x = randn(b, 2, d, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    seqlens = _cache_seqlens(b, size, device, gen) if mode == "circular" else None
    _check_step(x, state, weight, bias, seqlens, None, True, True, f"{mode} {layout}")
    assert state.data_ptr() == ptr and state.stride() == strides, "conv_state must stay the caller's view"
    if layout == "sliced_time":
        assert torch.equal(buffer[:, :, :2], untouched[:, :, :2]) and torch.equal(buffer[:, :, 2 + size :],
                                                                                untouched[:, :, 2 + size :])
    if layout == "every_other_row":
        assert torch.equal(buffer[1::2], untouched[1::2]), "rows outside the view must be untouched"


def _circular_state_from_history(history: torch.Tensor, size: int, filled: int) -> torch.Tensor:
    """A circular buffer of `size` whose entries before position `filled` are the last inputs."""
    b, d, hist = history.shape
    state = torch.zeros(b, d, size, dtype=history.dtype, device=history.device)
    for k in range(1, min(hist, size) + 1):
        state[:, :, (filled - k) % size] = history[:, :, hist - k]
    return state


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("width", [2, 4, 7])
def test_decode_token_by_token_equals_full_forward(backend, device, width, mode, chunk):
    """Prefill P tokens with `short_conv_fused`, decode the rest: the same outputs as one forward."""
    gen = seeded(34 + width)
    b, t, d, prefill = 2, 19, 5, 6
    x = randn(b, t, d, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    full = ccmps.short_conv_fused(x, weight, bias, None, True, True)
    head, history = ccmps.short_conv_fused(x[:, :prefill], weight, bias, None, True, True, return_final_states=True)
    if mode == "shift":
        state, seqlens = history.clone(), None
    else:
        size = width + 2
        state = _circular_state_from_history(history, size, prefill)
        seqlens = torch.full((b,), prefill, dtype=torch.int32, device=device)
    outs = [head]
    for start in range(prefill, t, chunk):
        step_x = x[:, start : start + chunk]
        outs.append(ccmps.short_conv_update(step_x, state, weight, bias, seqlens, True, True))
        if seqlens is not None:
            seqlens += step_x.shape[1]  # the caller advances the position
    decoded = torch.cat(outs, dim=1)
    assert_close_rel(decoded, full.to(torch.float64), torch.float32, f"{mode} decode vs forward")


@pytest.mark.parametrize("mode", MODES)
def test_gradients_through_the_step(backend, device, mode):
    """dx, dweight, dbias with the pre-update state as a constant; the state is still written."""
    gen = seeded(35)
    b, length, d, width, size = 3, 4, 5, 4, 5
    x = randn(b, length, d, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    state = randn(b, d, size, device=device, generator=gen)
    seqlens = _cache_seqlens(b, size, device, gen) if mode == "circular" else None
    before = state.clone()
    xg, wg, bg = leaf(x), leaf(weight), leaf(bias)
    out = ccmps.short_conv_update(xg, state, wg, bg, seqlens, True, True)
    dout = randn(*out.shape, device=device, generator=gen)
    out.backward(dout)

    x64, w64, b64 = leaf64(x), leaf64(weight), leaf64(bias)
    cpu_seqlens = None if seqlens is None else seqlens.cpu()
    ref_out, ref_state = oracle.short_conv_update(x64, before.cpu(), w64, b64, cpu_seqlens, True, True)
    ref_grads = oracle_grads([ref_out], [dout], [x64, w64, b64])
    assert_close_rel(out, ref_out, torch.float32, "out")
    assert_equal_exact(state, ref_state.to(device), "conv_state")
    for label, got, ref in zip(("dx", "dweight", "dbias"), (xg, wg, bg), ref_grads):
        assert_close_rel(got.grad, ref, torch.float32, label)


def test_fwd_only_records_no_graph(backend, device):
    gen = seeded(36)
    x = leaf(randn(2, 5, device=device, generator=gen))
    weight, bias = make_params(5, 4, torch.float32, device, gen)
    state = randn(2, 5, 3, device=device, generator=gen)
    ref_out, ref_state = oracle.short_conv_update(x.detach().cpu(), state.cpu(), weight.cpu(), bias.cpu())
    out = ccmps.short_conv_update_fwd_only(x, state, leaf(weight), leaf(bias))
    assert not out.requires_grad and out.grad_fn is None
    assert_close_rel(out, ref_out, torch.float32, "out")
    assert_equal_exact(state, ref_state.to(device), "conv_state")


def test_empty_batch(backend, device):
    x = torch.randn(0, 5, device=device)
    state = torch.randn(0, 5, 3, device=device)
    out = ccmps.short_conv_update(x, state, torch.randn(5, 4, device=device))
    assert out.shape == (0, 5)


@pytest.mark.parametrize("length", [None, 1, 6], ids=["2d", "L1", "L6"])
@pytest.mark.parametrize("activation", [None, "silu", "swish"])
@pytest.mark.parametrize("mode", MODES)
def test_causal_conv1d_update_dao_layout(backend, device, mode, activation, length):
    """Dao's `(B, D)` / `(B, D, L)` layout, no residual, string activation, in-place state."""
    gen = seeded(37)
    b, d, width, size = 3, 5, 4, 4
    x = randn(b, d, device=device, generator=gen) if length is None else randn(b, d, length, device=device,
                                                                                generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    state = randn(b, d, size, device=device, generator=gen)
    seqlens = _cache_seqlens(b, size, device, gen) if mode == "circular" else None
    ref_out, ref_state = oracle.causal_conv1d_update(x.cpu(), state.cpu(), weight.cpu(), bias.cpu(), activation,
                                                     None if seqlens is None else seqlens.cpu())
    out = ccmps.causal_conv1d_update(x, state, weight, bias, activation, seqlens)
    assert out.shape == x.shape
    assert_close_rel(out, ref_out, torch.float32, "out")
    assert_equal_exact(state, ref_state.to(device), "conv_state")


def test_causal_conv1d_update_with_indices(backend, device):
    gen = seeded(38)
    b, d, width, size, n_slots = 3, 5, 3, 2, 5
    x = randn(b, d, 2, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    state = randn(n_slots, d, size, device=device, generator=gen)
    indices = torch.tensor([3, -1, 1], dtype=torch.int32, device=device)
    ref_out, ref_state = oracle.causal_conv1d_update(x.cpu(), state.cpu(), weight.cpu(), bias.cpu(), "silu", None,
                                                     indices.cpu())
    out = ccmps.causal_conv1d_update(x, state, weight, bias, "silu", None, indices)
    assert_close_rel(out, ref_out, torch.float32, "out")
    assert_equal_exact(state, ref_state.to(device), "conv_state")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 3),
    d=st.integers(1, 6),
    width=st.integers(1, 9),
    extra=st.integers(0, 4),
    length=st.integers(1, 12),
    circular=st.booleans(),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_reference_matches_oracle(monkeypatch, b, d, width, extra, length, circular, padded, seed):
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "reference")
    gen = seeded(seed)
    mode = "circular" if circular else "shift"
    size = _state_size(width, extra, mode)
    x = randn(b, length, d, dtype=torch.float64, generator=gen)
    weight, bias = make_params(d, width, torch.float64, "cpu", gen)
    n_slots = b + 2
    state = randn(n_slots, d, size, dtype=torch.float64, generator=gen)
    indices = torch.randperm(n_slots, generator=gen)[:b].to(torch.int32)
    if padded:
        indices[0] = -1
    seqlens = _cache_seqlens(b, size, "cpu", gen) if circular else None
    _check_step(x, state, weight, bias, seqlens, indices, True, True, "property")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_weights_are_not_rounded_to_x_dtype(backend, device, dtype):
    """docs/CONTRACT.md section 2: taps (-1, 1 + 2**-12) over a constant 1 give 2**-12; rounded weights would give 0."""
    b, d = 2, 3
    x = torch.ones(b, d, dtype=dtype, device=device)
    state = torch.ones(b, d, 1, dtype=dtype, device=device)
    weight = torch.tensor([[-1.0, 1.0 + 2.0**-12]] * d, device=device)
    out = ccmps.short_conv_update(x, state, weight, None, None, False, False)
    assert_close_rel(out, torch.full((b, d), 2.0**-12, dtype=torch.float64), dtype, "out")


@pytest.mark.parametrize("length", [1, 3, 9], ids=["L1", "L3", "L9"])
@pytest.mark.parametrize(
    "positions", [[-1, -5], [2**31 - 1, 2**31 - 2], [2**32 + 1, -(2**40) - 3]],
    ids=["negative", "near_int32_max", "int64_huge"],
)
def test_circular_positions_follow_python_modulo_and_stay_in_the_state(backend, device, positions, length):
    """Any cache_seqlens value (negative, near 2**31, beyond int32) means column (pos + i) mod S, exactly in
    64-bit; the state is a window of a larger buffer whose other entries must never be written."""
    gen = seeded(40)
    b, d, width, size = 2, 5, 4, 5
    dtype = torch.int32 if max(map(abs, positions)) < 2**31 else torch.int64
    seqlens = torch.tensor(positions, dtype=dtype, device=device)
    buffer = randn(b + 2, d + 2, size + 6, device=device, generator=gen)
    state = buffer[1:1 + b, 1:1 + d, 3:3 + size]
    guard = torch.ones_like(buffer, dtype=torch.bool)
    guard[1:1 + b, 1:1 + d, 3:3 + size] = False
    outside = buffer[guard].clone()
    x = randn(b, length, d, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    _check_step(x, state, weight, bias, seqlens, None, True, True, f"positions {positions}")
    assert torch.equal(buffer[guard], outside), "the step wrote outside the conv_state view"


def test_int64_state_indices_are_not_truncated(backend, device):
    """Slot -2**32 is padding (truncated to int32 it would be slot 0 and overwrite it)."""
    gen = seeded(41)
    b, d, width, size = 2, 5, 4, 3
    state = randn(3, d, size, device=device, generator=gen)
    before = state.clone()
    x = randn(b, d, device=device, generator=gen)
    weight, bias = make_params(d, width, torch.float32, device, gen)
    indices = torch.tensor([-(2**32), 2], dtype=torch.int64, device=device)
    out = _check_step(x, state, weight, bias, None, indices, True, True, "int64 indices")
    assert (out[0] == 0).all() and torch.equal(state[:2], before[:2])


@pytest.mark.parametrize("mode", MODES)
def test_padding_rows_ignore_nan_in_their_input_and_state(backend, device, mode):
    """conv_state_indices < 0: output exactly 0 and no state touched, even when x or the slot such a row
    would read holds NaN/Inf; through the gradient route dx = 0 there and dweight/dbias stay finite."""
    gen = seeded(42)
    b, length, d, width, size = 3, 2, 5, 4, 4
    state = randn(3, d, size, device=device, generator=gen)
    state[0] = float("nan")  # slot 0: unused by the live row, and what a clamped padding index would read
    indices = torch.tensor([-1, 2, -7], dtype=torch.int32, device=device)
    x = randn(b, length, d, device=device, generator=gen)
    x[0] = float("nan")
    x[2, 1] = float("inf")
    seqlens = _cache_seqlens(b, size, device, gen) if mode == "circular" else None
    before = state.clone()
    out = ccmps.short_conv_update_fwd_only(x, state, *make_params(d, width, torch.float32, device, seeded(43)),
                                           seqlens, conv_state_indices=indices)
    assert torch.isfinite(out).all() and (out[[0, 2]] == 0).all()
    assert torch.equal(state[:2].isnan(), before[:2].isnan()) and torch.isnan(state[0]).all()

    state = before.clone()
    weight, bias = make_params(d, width, torch.float32, device, seeded(43))
    xg, wg, bg = leaf(x), leaf(weight), leaf(bias)
    out = ccmps.short_conv_update(xg, state, wg, bg, seqlens, conv_state_indices=indices)
    dout = randn(*out.shape, device=device, generator=gen)
    dout[0] = float("nan")  # a padding row's output is a constant: its gradient never flows back
    out.backward(dout)
    assert torch.isfinite(out).all() and (out[[0, 2]] == 0).all()
    assert (xg.grad[[0, 2]] == 0).all() and torch.isfinite(xg.grad).all()
    assert torch.isfinite(wg.grad).all() and torch.isfinite(bg.grad).all()
    x64, w64, b64 = leaf64(torch.where(torch.isfinite(x), x, 0)), leaf64(weight), leaf64(bias)
    ref_out, ref_state = oracle.short_conv_update(x64, before.cpu(), w64, b64,
                                                  None if seqlens is None else seqlens.cpu(), True, True,
                                                  indices.cpu())
    ref_grads = oracle_grads([ref_out], [torch.where(torch.isfinite(dout), dout, 0)], [x64, w64, b64])
    assert_close_rel(out, ref_out, torch.float32, "out")
    for label, got, ref in zip(("dx", "dweight", "dbias"), (xg, wg, bg), ref_grads):
        assert_close_rel(got.grad, ref, torch.float32, label)
    assert torch.equal(state[1:], ref_state[1:].to(device)) and torch.isnan(state[0]).all()
