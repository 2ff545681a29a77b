"""`causal_conv1d_varlen_states` (docs/CONTRACT.md section 3.9): decode caches from a packed prefill."""

from __future__ import annotations

import pytest
import torch

import causal_conv1d_mps as ccmps
import oracle
from conftest import X_DTYPES, assert_close_rel, assert_equal_exact, make_params, randn, seeded

BOUNDS = [0, 0, 1, 4, 4, 12, 30, 33]  # empty, shorter and longer than the state


@pytest.mark.parametrize("state_len", [0, 1, 3, 5, 20])
@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
def test_matches_oracle_exactly(backend, device, dtype, state_len):
    gen = seeded(40)
    d = 5
    x = randn(BOUNDS[-1], d, dtype=dtype, device=device, generator=gen)
    cu = torch.tensor(BOUNDS, dtype=torch.int32, device=device)
    states = ccmps.causal_conv1d_varlen_states(x, cu, state_len)
    ref = oracle.causal_conv1d_varlen_states(x.cpu(), cu.cpu(), state_len)
    assert states.is_contiguous()
    assert_equal_exact(states, ref.to(device), f"states (state_len {state_len})")


def test_strided_rows_and_int64_offsets(backend, device):
    """Rows of a wider buffer (stride(1) == 1) and int64 cu_seqlens give the same states."""
    gen = seeded(41)
    wide = randn(BOUNDS[-1], 12, device=device, generator=gen)
    x = wide[:, 2:9]
    cu = torch.tensor(BOUNDS, dtype=torch.int64, device=device)
    states = ccmps.causal_conv1d_varlen_states(x, cu, 4)
    assert_equal_exact(states, oracle.causal_conv1d_varlen_states(x.cpu(), cu.cpu(), 4).to(device), "states")


def test_no_sequences(backend, device):
    x = torch.randn(0, 5, device=device)
    states = ccmps.causal_conv1d_varlen_states(x, torch.zeros(1, dtype=torch.int32, device=device), 3)
    assert states.shape == (0, 5, 3)


@pytest.mark.parametrize("width", [2, 4])
def test_states_continue_a_packed_prefill(backend, device, width):
    """States built after a packed prefill == the fused op's final states; decoding from them
    continues each sequence exactly as a forward over the whole sequence would."""
    gen = seeded(42)
    d = 5
    bounds = [0, 3, 3, 11, 12]
    n, total = len(bounds) - 1, bounds[-1]
    decode_len = 2
    seqs = [randn(bounds[i + 1] - bounds[i] + decode_len, d, device=device, generator=gen) for i in range(n)]
    packed = torch.cat([s[:-decode_len] for s in seqs])[None]  # [1, total, D]
    assert packed.shape[1] == total
    weight, bias = make_params(d, width, torch.float32, device, gen)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    _, final = ccmps.short_conv_fused(packed, weight, bias, return_final_states=True, cu_seqlens=cu)
    states = ccmps.causal_conv1d_varlen_states(packed[0], cu, width - 1)
    assert_equal_exact(states, final, "varlen states vs fused final states")

    for i, seq in enumerate(seqs):
        cache = states[i : i + 1].clone()
        steps = [ccmps.short_conv_update(seq[None, t], cache, weight, bias) for t in range(len(seq) - decode_len,
                                                                                         len(seq))]
        full = ccmps.short_conv_fused(seq[None], weight, bias)[:, -decode_len:]
        assert_close_rel(torch.stack(steps, dim=1), full.to(torch.float64), torch.float32, f"sequence {i}")
