"""Fuzz against the float64 oracle for the edge cases of issue 14, on every backend.

Each case draws small shapes and awkward arguments from a fixed seed (so a failure reproduces from its
test id): packed sequences with padding and 64-bit ids beyond int32, attention masks with zeros, empty
packed sequences, circular decode positions that are negative or far beyond 2**31, padding slots, states
that are windows of larger buffers. NaN and Inf are planted where they must not matter (padding
positions and rows, masked positions, other sequences' slots) and sometimes inside one sequence, where
they must propagate exactly as in the oracle. Outputs, final states and gradients are compared entry by
entry for NaN/Inf and at the dtype's tolerance elsewhere; decode states bitwise; memory around a state
window must stay untouched.

Budget: kernel backends on CPU run in an interpreter or harness, so they take a few cases per op.
"""

from __future__ import annotations

import torch

import causal_conv1d_mps as ccmps
import oracle
from conftest import assert_close_nonfinite, assert_equal_exact, leaf, leaf64, oracle_grads, uses_small_shapes

NON_FINITE = (float("nan"), float("inf"), float("-inf"))


def _cases(backend: str, device: torch.device) -> range | tuple[int, ...]:
    if backend == "metal" and device.type == "cpu":
        # the harness compiles and runs C++ per call; case 18 (a NaN gradient beside a tap of another
        # sequence, W = 6) once leaked into the Metal dweight
        return (0, 1, 2, 18)
    return range(8) if uses_small_shapes(backend, device) else range(40)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _int(gen, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _plant(t: torch.Tensor, where: torch.Tensor, gen, share: float = 0.5) -> torch.Tensor:
    """`t` with NaN/+Inf/-Inf at about `share` of the entries where `where` is true (broadcast)."""
    where = where.expand_as(t)
    pick = where & (torch.rand(t.shape, generator=gen) < share)
    kinds = torch.randint(0, 3, t.shape, generator=gen)
    values = torch.tensor(NON_FINITE)[kinds]
    return torch.where(pick, values, t)


def _seq_idx_rows(gen, b: int, t: int, wide_ids: bool) -> torch.Tensor:
    """`[B, T]` int64: runs of sequence ids and padding (negative), ids beyond int32 when `wide_ids`."""
    rows = []
    for _ in range(b):
        row, next_id = [], 0
        while len(row) < t:
            run = _int(gen, 1, 6)
            padding = _int(gen, 0, 3) == 0
            value = -_int(gen, 1, 3) if padding else next_id
            if not padding:
                next_id += 1
            row += [value] * run
        rows.append(row[:t])
    ids = torch.tensor(rows, dtype=torch.int64)
    if wide_ids:  # 0 and 2**32 (or 2**31) must stay distinct sequences
        big = torch.tensor([0, 2**32, 2**31, -(2**32)], dtype=torch.int64)
        ids = torch.where(ids >= 0, ids * 5 + big[ids.clamp(min=0) % 3], ids)
    return ids


def _check(got: list, ref: list, names: list, dtype, case: str) -> None:
    for g, r, name in zip(got, ref, names):
        if r is None:
            continue
        assert g is not None, f"{case} {name}: no result"
        assert_close_nonfinite(g, r, dtype, f"{case} {name}")


def test_fuzz_causal_conv1d_packed_sequences(backend, device):
    for case in _cases(backend, device):
        _causal_case(case, device)


def _causal_case(case: int, device: torch.device) -> None:
    """Fuzz case `case` of causal_conv1d with seq_idx on the backend in force, against the oracle."""
    gen = torch.Generator().manual_seed(1000 + case)
    b, d, t, width = _int(gen, 1, 3), _int(gen, 1, 6), _int(gen, 1, 20), _int(gen, 1, 6)
    silu = bool(_int(gen, 0, 1))
    seq_idx = _seq_idx_rows(gen, b, t, wide_ids=bool(_int(gen, 0, 1)))
    padding = (seq_idx < 0)[:, None, :]
    x = _plant(_randn(gen, b, d, t), padding, gen)
    inside = _int(gen, 0, 2) == 0  # sometimes a NaN inside one sequence too
    if inside and (seq_idx >= 0).any():
        pos = (seq_idx[0] >= 0).nonzero()
        if pos.numel():
            x[0, 0, int(pos[_int(gen, 0, pos.numel() - 1)])] = float("nan")
    weight, bias = _randn(gen, d, width) * width**-0.5, _randn(gen, d) * 0.5
    states = _randn(gen, b, d, width - 1) if _int(gen, 0, 1) else None
    if states is not None:  # the states of a row that starts with padding belong to that padding
        states = _plant(states, (seq_idx[:, :1] < 0)[:, :, None], gen)
    channel_last = bool(_int(gen, 0, 1))
    dout = _plant(_randn(gen, b, d, t), padding, gen)  # dout at padding never flows back
    dfinal = _randn(gen, b, d, width - 1)
    name = f"case {case}: B{b} D{d} T{t} W{width} silu={silu} states={states is not None} ids={seq_idx.tolist()}"

    xd = x.to(device)
    if channel_last:
        xd = xd.transpose(1, 2).contiguous().transpose(1, 2)
    xg, wg, bg, sg = leaf(xd), leaf(weight.to(device)), leaf(bias.to(device)), leaf(
        None if states is None else states.to(device))
    out, final = ccmps.causal_conv1d(xg, wg, bg, "silu" if silu else None, seq_idx=seq_idx.to(device),
                                     initial_states=sg, return_final_states=True)
    torch.autograd.backward([out, final], [dout.to(device), dfinal.to(device)])

    x64, w64, b64, s64 = leaf64(x), leaf64(weight), leaf64(bias), leaf64(states)
    ref_out, ref_final = oracle.causal_conv1d(x64, w64, b64, "silu" if silu else None, seq_idx=seq_idx,
                                              initial_states=s64)
    ref_grads = oracle_grads([ref_out, ref_final], [dout, dfinal], [x64, w64, b64, s64])
    _check([out, final, xg.grad, wg.grad, bg.grad, None if sg is None else sg.grad],
           [ref_out, ref_final, *ref_grads], ["out", "final", "dx", "dweight", "dbias", "dinitial_states"],
           torch.float32, name)
    assert (out.detach().cpu()[padding.expand(b, d, t)] == 0).all(), f"{name}: padding outputs must be 0"


def test_fuzz_short_conv_fused_masks_and_packing(backend, device):
    for case in _cases(backend, device):
        gen = torch.Generator().manual_seed(2000 + case)
        d, width = _int(gen, 1, 6), _int(gen, 1, 6)
        packed = bool(_int(gen, 0, 1))
        if packed:
            lengths = [_int(gen, 0, 7) for _ in range(_int(gen, 0, 4))]
            bounds = [0]
            for n in lengths:
                bounds.append(bounds[-1] + n)
            cu = torch.tensor(bounds, dtype=torch.int64 if _int(gen, 0, 1) else torch.int32)
            b, t, rows = 1, bounds[-1], len(lengths)
        else:
            cu, b, t = None, _int(gen, 1, 3), _int(gen, 1, 16)
            rows = b
        mask = torch.rand(b, t, generator=gen) > 0.3
        if _int(gen, 0, 1):
            mask = mask.float() * torch.rand(b, t, generator=gen).clamp(min=0.1)  # non-binary values too
        masked = (mask == 0)[:, :, None]
        x = _plant(_randn(gen, b, t, d), masked, gen)
        if packed and t > 0 and _int(gen, 0, 1):
            x[0, _int(gen, 0, t - 1), 0] = float("nan")  # inside one packed sequence
        weight, bias = _randn(gen, d, width) * width**-0.5, _randn(gen, d) * 0.5
        states = _randn(gen, rows, d, width - 1) if _int(gen, 0, 1) else None
        activation, residual = bool(_int(gen, 0, 1)), bool(_int(gen, 0, 1))
        dout, dfinal = _randn(gen, b, t, d), _randn(gen, rows, d, width - 1)
        name = (f"case {case}: B{b} T{t} D{d} W{width} act={activation} res={residual} cu={cu} "
                f"states={states is not None}")

        xg, wg, bg, sg = leaf(x.to(device)), leaf(weight.to(device)), leaf(bias.to(device)), leaf(
            None if states is None else states.to(device))
        out, final = ccmps.short_conv_fused(xg, wg, bg, mask.to(device), activation, residual, initial_states=sg,
                                            return_final_states=True,
                                            cu_seqlens=None if cu is None else cu.to(device))
        torch.autograd.backward([out, final], [dout.to(device), dfinal.to(device)])

        x64, w64, b64, s64 = leaf64(x), leaf64(weight), leaf64(bias), leaf64(states)
        ref_out, ref_final = oracle.short_conv_fused(x64, w64, b64, mask, activation, residual, initial_states=s64,
                                                     cu_seqlens=cu)
        ref_grads = oracle_grads([ref_out, ref_final], [dout, dfinal], [x64, w64, b64, s64])
        _check([out, final, xg.grad, wg.grad, bg.grad, None if sg is None else sg.grad],
               [ref_out, ref_final, *ref_grads], ["out", "final", "dx", "dweight", "dbias", "dinitial_states"],
               torch.float32, name)


POSITIONS = (-(2**40) - 3, -(2**31), -7, -1, 0, 3, 2**31 - 2, 2**31 - 1, 2**32 + 5)


def test_fuzz_decode_positions_slots_and_bounds(backend, device):
    for case in _cases(backend, device):
        gen = torch.Generator().manual_seed(3000 + case)
        b, d, width, length = _int(gen, 1, 4), _int(gen, 1, 6), _int(gen, 1, 5), _int(gen, 1, 6)
        size = max(width - 1 + _int(gen, 0, 3), 1)
        circular, wide = bool(_int(gen, 0, 1)), bool(_int(gen, 0, 1))
        n_slots = b + _int(gen, 0, 2)
        slots = torch.randperm(n_slots, generator=gen)[:b]
        padded = torch.rand(b, generator=gen) < 0.35
        indices = torch.where(padded, torch.tensor(-(2**33) if wide else -1), slots)
        indices = indices.to(torch.int64 if wide else torch.int32)
        seqlens = None
        if circular:
            picks = torch.randint(0, len(POSITIONS), (b,), generator=gen)
            values = torch.tensor(POSITIONS, dtype=torch.int64)[picks]
            if not wide:
                values = values.clamp(-(2**31), 2**31 - 1)
            seqlens = values.to(torch.int64 if wide else torch.int32)
        # the state is a window of a larger buffer: nothing outside it may change
        buffer = _randn(gen, n_slots + 1, d + 1, size + 3)
        unused = torch.ones(n_slots, dtype=torch.bool)
        unused[indices[indices >= 0].long()] = False
        buffer[:n_slots][unused] = float("nan")  # slots no live row owns (a padding row must not read them)
        x = _plant(_randn(gen, b, length, d), padded[:, None, None], gen, share=1.0)
        weight, bias = _randn(gen, d, width) * width**-0.5, _randn(gen, d) * 0.5
        activation, residual = bool(_int(gen, 0, 1)), bool(_int(gen, 0, 1))
        grad = bool(_int(gen, 0, 1))
        name = (f"case {case}: B{b} L{length} D{d} W{width} S{size} slots={indices.tolist()} "
                f"positions={None if seqlens is None else seqlens.tolist()} grad={grad}")

        initial = buffer[:n_slots, :d, 1:1 + size].clone()
        ref_out, ref_state = oracle.short_conv_update(x, initial, weight, bias, seqlens, activation, residual,
                                                      indices)
        dev_buffer = buffer.to(device, copy=True)
        state = dev_buffer[:n_slots, :d, 1:1 + size]
        before = dev_buffer.clone()
        xg, wg, bg = (leaf(x.to(device)), leaf(weight.to(device)), leaf(bias.to(device))) if grad else \
            (x.to(device), weight.to(device), bias.to(device))
        out = ccmps.short_conv_update(xg, state, wg, bg, None if seqlens is None else seqlens.to(device),
                                      activation, residual, conv_state_indices=indices.to(device))
        assert_close_nonfinite(out, ref_out, torch.float32, f"{name} out")
        assert (out.detach().cpu()[padded] == 0).all(), f"{name}: padding rows must output 0"
        assert_equal_exact(state, ref_state.to(device), f"{name} conv_state")
        outside = torch.ones(dev_buffer.shape, dtype=torch.bool)
        outside[:n_slots, :d, 1:1 + size] = False
        assert_equal_exact(dev_buffer.cpu()[outside], before.cpu()[outside], f"{name} memory around the state")
        if grad:
            dout = _plant(_randn(gen, *out.shape), padded[:, None, None], gen)
            out.backward(dout.to(device))
            x64, w64, b64 = leaf64(x), leaf64(weight), leaf64(bias)
            ref64, _ = oracle.short_conv_update(x64, initial, w64, b64, seqlens, activation, residual, indices)
            ref_grads = oracle_grads([ref64], [dout], [x64, w64, b64])
            _check([xg.grad, wg.grad, bg.grad], ref_grads, ["dx", "dweight", "dbias"], torch.float32, name)
