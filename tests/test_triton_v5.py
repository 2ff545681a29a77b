"""The run-based forward kernel (`triton/kernels/conv_fwd_runs.py`) against the float64 oracle.

Small tile overrides make interior tiles (the register-window path) appear at the small shapes the
interpreter can afford, next to boundary tiles (first tile, partial last tile, partial D tile).
"""

from __future__ import annotations

import pytest
import torch

import causal_conv1d_mps as ccmps
import oracle
from conftest import assert_close_rel, make_params, randn, seeded

pytestmark = pytest.mark.triton


RUNS_CONTIGUOUS = dict(BT=16, BD=4, R=8, num_warps=1)
RUNS_CHANNEL_LAST = dict(BT=8, BD=16, R=4, num_warps=1)


@pytest.mark.parametrize("width", [1, 2, 4, 5, 8, 9])
@pytest.mark.parametrize("channel_last", [False, True], ids=["contiguous", "channel_last"])
def test_runs_forward_matches_oracle(triton_backend, tiles, width, channel_last):
    device = triton_backend
    tiles("conv_fwd_" + ("channel_last" if channel_last else "contiguous"),
          **(RUNS_CHANNEL_LAST if channel_last else RUNS_CONTIGUOUS))
    gen = seeded(width)
    B, D, T = 2, 12, 70  # D = 12: one full and one partial 4-channel tile... and a partial 16-channel tile
    weight, bias = make_params(D, width, torch.float32, device, gen)
    if channel_last:
        x = randn(B, T, D, device=device, generator=gen).transpose(1, 2)
    else:
        x = randn(B, D, T, device=device, generator=gen)
    out = ccmps.causal_conv1d(x, weight, bias, "silu")
    ref, _ = oracle.causal_conv1d(x, weight, bias, "silu")
    assert out.stride() == x.stride()
    assert_close_rel(out, ref, torch.float32, f"runs forward W{width}")


@pytest.mark.parametrize("channel_last", [False, True], ids=["contiguous", "channel_last"])
def test_runs_forward_bf16_no_bias_with_states(triton_backend, tiles, channel_last):
    """bf16, no bias, no activation, initial states (read by the first tile only) and final states."""
    device = triton_backend
    tiles("conv_fwd_" + ("channel_last" if channel_last else "contiguous"),
          **(RUNS_CHANNEL_LAST if channel_last else RUNS_CONTIGUOUS))
    gen = seeded(3)
    B, D, T, W = 1, 16, 64, 4
    weight, _ = make_params(D, W, torch.bfloat16, device, gen, with_bias=False)
    x = (randn(B, T, D, dtype=torch.bfloat16, device=device, generator=gen).transpose(1, 2) if channel_last
         else randn(B, D, T, dtype=torch.bfloat16, device=device, generator=gen))
    h0 = randn(B, D, W - 1, dtype=torch.bfloat16, device=device, generator=gen)
    out, final = ccmps.causal_conv1d(x, weight, None, None, initial_states=h0, return_final_states=True)
    ref, ref_final = oracle.causal_conv1d(x, weight, None, None, initial_states=h0)
    assert_close_rel(out, ref, torch.bfloat16, "runs forward bf16")
    assert_close_rel(final, ref_final, torch.bfloat16, "final states")


@pytest.mark.parametrize("channel_last", [False, True], ids=["contiguous", "channel_last"])
def test_runs_forward_seq_idx(triton_backend, tiles, channel_last):
    """Packed sequences: every tile takes the boundary path, taps never cross a sequence."""
    device = triton_backend
    tiles("conv_fwd_" + ("channel_last" if channel_last else "contiguous"),
          **(RUNS_CHANNEL_LAST if channel_last else RUNS_CONTIGUOUS))
    gen = seeded(5)
    B, D, T, W = 2, 8, 48, 4
    weight, bias = make_params(D, W, torch.float32, device, gen)
    x = randn(B, T, D, device=device, generator=gen).transpose(1, 2) if channel_last else randn(
        B, D, T, device=device, generator=gen)
    seq_idx = torch.tensor([[0] * 20 + [1] * 25 + [-1] * 3, [2] * 48], dtype=torch.int32, device=device)
    out = ccmps.causal_conv1d(x, weight, bias, "silu", seq_idx=seq_idx)
    ref, _ = oracle.causal_conv1d(x, weight, bias, "silu", seq_idx=seq_idx)
    assert_close_rel(out, ref, torch.float32, "runs forward seq_idx")


def test_runs_fused_mask_contains_nan(triton_backend, tiles):
    """short_conv_fused on the channel-last run kernel: a masked-out NaN reaches only its own output
    (through the residual), never a neighbour's taps (selection, not a product with 0)."""
    device = triton_backend
    tiles("conv_fwd_channel_last", **RUNS_CHANNEL_LAST)
    gen = seeded(7)
    B, T, D, W = 2, 64, 16, 4
    weight, bias = make_params(D, W, torch.float32, device, gen)
    x = randn(B, T, D, device=device, generator=gen)
    mask = (torch.rand(B, T, generator=gen) > 0.3).to(device=device, dtype=torch.int64)
    mask[0, 37] = 0  # an interior position of the first row
    x_nan = x.clone()
    x_nan[0, 37, 5] = float("nan")
    with torch.no_grad():
        out = ccmps.short_conv_fused(x_nan, weight, bias, mask, True, True)
    ref, _ = oracle.short_conv_fused(x, weight, bias, mask, True, True)
    assert torch.isnan(out[0, 37, 5]), "the residual keeps the position's own NaN"
    finite = torch.ones_like(out, dtype=torch.bool)
    finite[0, 37, 5] = False
    assert not torch.isnan(out[finite]).any(), "a masked NaN leaked into other outputs"
    clean = out.clone()
    clean[0, 37, 5] = ref[0, 37, 5].to(out.dtype)
    assert_close_rel(clean, ref, torch.float32, "fused forward with mask")


@pytest.mark.parametrize("width, dtype", [(2, torch.bfloat16), (4, torch.bfloat16), (4, torch.float16),
                                          (7, torch.bfloat16)], ids=["W2-bf16", "W4-bf16", "W4-fp16", "W7-bf16"])
def test_default_dispatch_contiguous(triton_backend, width, dtype):
    """(B, D, T) 16-bit shapes that the default configs send to the run kernel, on its own tiles."""
    from causal_conv1d_mps.triton import _config

    device = triton_backend
    B, D, T = 1, 8, 1024
    assert _config.conv_tiles(T, D, width, False, device.type == "cpu", 2).get("R"), "not the run kernel"
    gen = seeded(20 + width)
    weight, bias = make_params(D, width, dtype, device, gen)
    x = randn(B, D, T, dtype=dtype, device=device, generator=gen)
    out = ccmps.causal_conv1d(x, weight, bias, "silu")
    ref, _ = oracle.causal_conv1d(x, weight, bias, "silu")
    assert_close_rel(out, ref, dtype, f"(B, D, T) W{width}")


@pytest.mark.parametrize("W", [4, 8])
def test_default_dispatch_fused_channel_last(triton_backend, W):
    """short_conv_fused, W = 4 and 8, D = 256: the default channel-last run tiles, with a 0/1 mask and a NaN
    under a masked position of an interior tile (boundary tiles are `conv_fwd`'s path)."""
    from causal_conv1d_mps.triton import _config

    device = triton_backend
    B, T, D = 1, 160, 256
    assert _config.conv_tiles(T, D, W, True, device.type == "cpu", 2).get("R"), "not the run kernel"
    gen = seeded(31)
    weight, bias = make_params(D, W, torch.bfloat16, device, gen)
    x = randn(B, T, D, dtype=torch.bfloat16, device=device, generator=gen)
    mask = (torch.rand(B, T, generator=gen) > 0.25).to(device=device, dtype=torch.bool)
    mask[0, 100] = False
    x_nan = x.clone()
    x_nan[0, 100, 200] = float("nan")
    with torch.no_grad():
        out = ccmps.short_conv_fused(x_nan, weight, bias, mask, True, True)
    ref, _ = oracle.short_conv_fused(x, weight, bias, mask, True, True)
    leaked = torch.isnan(out)
    leaked[0, 100, 200] = False
    assert not leaked.any(), "a masked NaN leaked into other outputs"
    clean = out.clone()
    clean[0, 100, 200] = ref[0, 100, 200].to(out.dtype)
    assert_close_rel(clean, ref, torch.bfloat16, f"fused channel-last W{W}")
