"""The run-based backward kernel (`triton/kernels/conv_bwd_runs.py`) against the float64 oracle.

Small tile overrides make interior tiles (the register-run path, with and without the carried dpre rows)
appear at the small shapes the interpreter can afford, next to the general tiles (the steps before the
first run, the tail, initial states, final-state gradients). Every test also checks which backward kernel
ran, through a spy on the launcher.
"""

from __future__ import annotations

import pytest
import torch

import causal_conv1d_mps as ccmps
import oracle
from conftest import (assert_close_nonfinite, assert_close_rel, check_silu_conv_with_seq_idx, leaf, leaf64, make_params,
                      oracle_grads, randn, seeded)

pytestmark = pytest.mark.triton

RUNS_BWD = "conv_bwd_runs_kernel"
OLD_BWD = "conv_bwd_kernel"


@pytest.fixture
def launched(monkeypatch):
    """The names of the kernels launched by the convolution launchers during the test, in order. The CUDA C++
    kernels are turned off: on a GPU they would take the (B, D, T) calls whose Triton dispatch is tested."""
    from causal_conv1d_mps.triton import launch_conv

    monkeypatch.setenv("CAUSAL_CONV1D_CUDA_KERNELS", "0")

    names: list[str] = []
    real = launch_conv.launch

    def spy(kernel, *args, **kwargs):
        names.append(getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel)))
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(launch_conv, "launch", spy)
    return names


# interior tiles at small sizes: one run per tile with the carried dpre rows, or two runs per tile
CL_CARRY = dict(BT=4, BD=16, R=4, HR=4, HF=4, TILES=3, CARRY=True, VEC=4, num_warps=1)
CL_RUNS = dict(BT=8, BD=16, R=4, HR=4, HF=4, TILES=2, CARRY=False, VEC=8, num_warps=1)
BDT_RUNS = dict(BT=16, BD=4, R=8, HR=8, HF=8, TILES=2, CARRY=False, num_warps=1)
BDT_CARRY = dict(BT=8, BD=8, R=8, HR=8, HF=8, TILES=4, CARRY=True, num_warps=1)
CONFIGS = {"cl-carry": (True, CL_CARRY), "cl-runs": (True, CL_RUNS), "bdt-runs": (False, BDT_RUNS),
           "bdt-carry": (False, BDT_CARRY)}


def _check_causal_conv1d(x, weight, bias, activation, initial_states=None, name=""):
    """Forward + backward of `causal_conv1d` (gradients on out and, with states, final states) against the
    oracle; returns the gradients."""
    dtype = x.dtype
    xg, wg, bg, hg = leaf(x), leaf(weight), leaf(bias), leaf(initial_states)
    with_states = initial_states is not None
    result = ccmps.causal_conv1d(xg, wg, bg, activation, initial_states=hg, return_final_states=with_states)
    out, final = result if with_states else (result, None)
    gen = seeded(11)
    dout = randn(*out.shape, dtype=dtype, device=x.device, generator=gen)
    dfinal = randn(*final.shape, dtype=dtype, device=x.device, generator=gen) if with_states else None
    torch.autograd.backward([t for t in (out, final) if t is not None],
                            [t for t in (dout, dfinal) if t is not None])
    x64, w64, b64, h64 = leaf64(x), leaf64(weight), leaf64(bias), leaf64(initial_states)
    ref_out, ref_final = oracle.causal_conv1d(x64, w64, b64, activation, initial_states=h64)
    ref_grads = oracle_grads([ref_out, ref_final], [dout, dfinal], [x64, w64, b64, h64])
    assert_close_rel(out, ref_out, dtype, f"{name} out")
    for label, got, ref in zip(("dx", "dweight", "dbias", "dinitial_states"), (xg, wg, bg, hg), ref_grads):
        if got is not None:
            assert_close_rel(got.grad, ref, dtype, f"{name} {label}")
    return [t.grad for t in (xg, wg, bg, hg) if t is not None]


def _input(B, D, T, channel_last, dtype, device, gen):
    if channel_last:
        return randn(B, T, D, dtype=dtype, device=device, generator=gen).transpose(1, 2)
    return randn(B, D, T, dtype=dtype, device=device, generator=gen)


@pytest.mark.parametrize("width", [2, 3, 4, 5])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_runs_backward_matches_oracle(triton_backend, tiles, launched, config, width):
    """T = 45 / 75: the interior runs, the HR steps before them and a tail that is not a whole tile."""
    device = triton_backend
    channel_last, cfg = CONFIGS[config]
    tiles("conv_bwd_" + ("channel_last" if channel_last else "contiguous"), **cfg)
    gen = seeded(width)
    B, D, T = 2, 2 * cfg["BD"], 45 if channel_last else 75
    weight, bias = make_params(D, width, torch.float32, device, gen)
    x = _input(B, D, T, channel_last, torch.float32, device, gen)
    _check_causal_conv1d(x, weight, bias, "silu", name=f"{config} W{width}")
    assert RUNS_BWD in launched and OLD_BWD not in launched, launched


@pytest.mark.parametrize("width", [7, 8])
def test_runs_backward_wide_channel_last(triton_backend, tiles, launched, width):
    """W 7 and 8 on 8-step runs with 8-step halos (the channel-last candidate for W 5-8), T = 70."""
    device = triton_backend
    tiles("conv_bwd_channel_last", BT=8, BD=16, R=8, HR=8, HF=8, TILES=3, CARRY=True, VEC=2, num_warps=1)
    gen = seeded(40 + width)
    B, D, T = 1, 32, 70
    weight, bias = make_params(D, width, torch.float32, device, gen)
    x = _input(B, D, T, True, torch.float32, device, gen)
    _check_causal_conv1d(x, weight, bias, "silu", name=f"channel-last W{width}")
    assert RUNS_BWD in launched and OLD_BWD not in launched, launched


@pytest.mark.parametrize("config", list(CONFIGS))
def test_runs_backward_bf16_states_no_bias_identity(triton_backend, tiles, launched, config):
    """bf16, no bias, no activation, initial states and final-state gradients (general tiles at both
    ends), and a T for which no interior tile fits at all (every tile general)."""
    device = triton_backend
    channel_last, cfg = CONFIGS[config]
    tiles("conv_bwd_" + ("channel_last" if channel_last else "contiguous"), **cfg)
    gen = seeded(3)
    W = 4
    for T in (6, 64):
        weight, _ = make_params(cfg["BD"], W, torch.bfloat16, device, gen, with_bias=False)
        x = _input(1, cfg["BD"], T, channel_last, torch.bfloat16, device, gen)
        h0 = randn(1, cfg["BD"], W - 1, dtype=torch.bfloat16, device=device, generator=gen)
        _check_causal_conv1d(x, weight, None, None, initial_states=h0, name=f"{config} T{T}")
    assert launched.count(RUNS_BWD) == 2, launched


@pytest.mark.parametrize("config", ["cl-carry", "cl-runs"])
def test_runs_backward_fused_mask_contains_nan(triton_backend, tiles, launched, config):
    """short_conv_fused with a 0/1 mask and a NaN under a masked position inside an interior run: the NaN
    reaches no gradient (selection, not a product with 0), everything else matches the oracle."""
    device = triton_backend
    _, cfg = CONFIGS[config]
    tiles("conv_bwd_channel_last", **cfg)
    gen = seeded(7)
    B, T, D, W = 2, 40, 16, 4
    weight, bias = make_params(D, W, torch.float32, device, gen)
    x = randn(B, T, D, device=device, generator=gen)
    mask = (torch.rand(B, T, generator=gen) > 0.3).to(device=device, dtype=torch.int64)
    mask[0, 21] = 0  # inside the interior (runs start at step HR = 4)
    x_nan = x.clone()
    x_nan[0, 21, 5] = float("nan")
    xg, wg, bg = leaf(x_nan), leaf(weight), leaf(bias)
    out = ccmps.short_conv_fused(xg, wg, bg, mask, True, True)
    dout = randn(B, T, D, device=device, generator=gen)
    out.backward(dout)
    x64, w64, b64 = leaf64(x), leaf64(weight), leaf64(bias)
    ref, _ = oracle.short_conv_fused(x64, w64, b64, mask.cpu(), True, True)
    ref_grads = oracle_grads([ref], [dout], [x64, w64, b64])
    for label, got, want in zip(("dx", "dweight", "dbias"), (xg.grad, wg.grad, bg.grad), ref_grads):
        assert torch.isfinite(got).all(), f"{label}: a masked NaN leaked into the gradient"
        assert_close_nonfinite(got, want, torch.float32, f"fused {config} {label}")
    assert RUNS_BWD in launched, launched


def test_runs_backward_deterministic(triton_backend, tiles, launched):
    """Two identical backward runs give bitwise identical gradients (fixed-order partial rows)."""
    device = triton_backend
    tiles("conv_bwd_channel_last", **CL_CARRY)
    gen = seeded(9)
    B, T, D, W = 2, 50, 32, 4
    weight, bias = make_params(D, W, torch.float32, device, gen)
    x = randn(B, T, D, device=device, generator=gen)
    dout = randn(B, T, D, device=device, generator=gen)

    def grads():
        leaves = [leaf(x), leaf(weight), leaf(bias)]
        ccmps.short_conv_fused(*leaves).backward(dout)
        return [t.grad for t in leaves]

    for label, first, second in zip(("dx", "dweight", "dbias"), grads(), grads()):
        assert torch.equal(first, second), f"{label} differs between two identical backward runs"
    assert launched.count(RUNS_BWD) == 2, launched


def test_packed_sequences_keep_the_old_kernel(triton_backend, tiles, launched):
    """seq_idx (packed sequences) is not dispatched to the run kernel, even when its tiles are forced."""
    device = triton_backend
    tiles("conv_bwd_contiguous", **BDT_RUNS)
    gen = seeded(5)
    B, D, T, W = 1, 4, 48, 4
    weight, bias = make_params(D, W, torch.float32, device, gen)
    x = randn(B, D, T, device=device, generator=gen)
    seq_idx = torch.tensor([[0] * 20 + [1] * 25 + [-1] * 3], dtype=torch.int32, device=device)
    check_silu_conv_with_seq_idx(x, weight, bias, seq_idx, gen, "seq_idx")
    assert OLD_BWD in launched and RUNS_BWD not in launched, launched


@pytest.fixture
def measured():
    """`measured(pairs)`: set `_config.BWD_RUNS_MEASURED` for the test (restored, caches cleared, after it)."""
    from causal_conv1d_mps.triton import _config

    saved = _config.BWD_RUNS_MEASURED

    def set_pairs(pairs):
        _config.BWD_RUNS_MEASURED = frozenset(pairs)
        _config.clear()

    yield set_pairs
    _config.BWD_RUNS_MEASURED = saved
    _config.clear()


@pytest.mark.parametrize("channel_last", [False, True], ids=["contiguous", "channel_last"])
def test_measured_dispatch(triton_backend, launched, measured, channel_last):
    """A `(layout, W)` listed in `_config.BWD_RUNS_MEASURED` sends 16-bit shapes to the run kernel on the
    default tiles (the candidate's run and halo constants)."""
    from causal_conv1d_mps.triton import _config

    device = triton_backend
    B, D, T, W = (1, 128, 80, 4) if channel_last else (1, 8, 256, 4)
    measured({(channel_last, W)})
    cfg = _config.conv_bwd_tiles(T, D, W, channel_last, device.type == "cpu", 2)
    assert cfg.get("R"), f"not the run kernel: {cfg}"
    gen = seeded(21)
    weight, bias = make_params(D, W, torch.bfloat16, device, gen)
    x = _input(B, D, T, channel_last, torch.bfloat16, device, gen)
    _check_causal_conv1d(x, weight, bias, "silu", name=f"measured {'channel-last' if channel_last else '(B,D,T)'}")
    assert RUNS_BWD in launched and OLD_BWD not in launched, launched


def test_unmeasured_dispatch_keeps_old_kernel(triton_backend, launched, measured):
    """Shapes of a `(layout, W)` not in `_config.BWD_RUNS_MEASURED` keep `conv_bwd_kernel`."""
    device = triton_backend
    measured({(True, 3)})
    gen = seeded(22)
    weight, bias = make_params(8, 4, torch.bfloat16, device, gen)
    x = _input(1, 8, 256, False, torch.bfloat16, device, gen)
    _check_causal_conv1d(x, weight, bias, "silu", name="unmeasured")
    assert OLD_BWD in launched and RUNS_BWD not in launched, launched
