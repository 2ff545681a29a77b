"""The schemes of the channel-last CUDA C++ forward (`causal_conv1d_mps/cuda/kernels/conv_btd.cu`, chosen by
`launch_btd.forward_variant`) against the float64 oracle, element by element.

The schemes: 4 channels x 8 steps, 2 x 16 or 2 x 32 per thread, D compiled in (CC_D, x and out contiguous)
or runtime strides (views), runs inside [0, T) without bounds checks or not, and the mask's warp vote (all-ones runs
skip the mask; the others select). Each case runs a width on one side of a switch of `forward_variant`, at
shapes where every part of a scheme is reached: T = 100 (interior runs for both run lengths, and edge runs at
both ends), T = 3 < W, T = 70 (not a multiple of 8 or 32) with B = 1 and D = 260 (a block with a few channels
only), D = 12, and a strided view of the T = 100 input (runtime strides) beside its contiguous copy (D
compiled in). With a mask: row 0 masked over its first third (NaN and Inf there), fractional values in a
stretch of the middle for some cases, all-ones runs after it.
"""

from __future__ import annotations

import pytest
import torch

import oracle
from conftest import make_params, randn, record_defines, seeded

RTOL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # one rounding of a float32 result: half an ulp
ATOL = 1e-3


@pytest.fixture(autouse=True)
def _fresh_plans(monkeypatch):
    """An empty plan table per test (the spies below see each plan built)."""
    from causal_conv1d_mps.cuda import launch_btd

    monkeypatch.setattr(launch_btd, "_plans", {})


@pytest.fixture
def compiled(btd, monkeypatch):
    """The defines of each forward variant the launcher asks for, in order."""
    return record_defines(monkeypatch, "cc_conv_fwd_btd")


# (W, mask kind, x dtype, weight dtype, bias, activation, residual): each width on one side of a switch of
# forward_variant (D compiled in: 4 x 8 up to W 6, 2 x 16 from 7, 2 x 32 from 12 with a mask and from 13
# without; no bounds checks from W 5 with a mask at 4 x 8, from W 9 at 2 x 16, always at 2 x 32; runtime
# strides: 2 x 32 from W 6 with a mask, from 10 without)
CASES = [
    (4, "binary", torch.bfloat16, torch.bfloat16, True, "silu", True),
    (5, "fractional", torch.float16, torch.float32, False, "silu", True),
    (6, "binary", torch.bfloat16, torch.float32, True, None, False),
    (7, "fractional", torch.bfloat16, torch.bfloat16, True, "silu", True),
    (8, "binary", torch.bfloat16, torch.bfloat16, True, "silu", True),
    (9, "fractional", torch.float16, torch.float16, False, "silu", True),
    (11, "binary", torch.bfloat16, torch.float32, True, None, True),
    (12, "fractional", torch.bfloat16, torch.bfloat16, True, "silu", True),
    (16, "binary", torch.float16, torch.float16, True, "silu", True),
    (6, None, torch.float16, torch.float16, True, "silu", False),
    (7, None, torch.bfloat16, torch.float32, False, "silu", True),
    (8, None, torch.float16, torch.float32, True, "silu", True),
    (9, None, torch.float16, torch.float16, True, None, False),
    (10, None, torch.bfloat16, torch.bfloat16, True, "silu", False),
    (12, None, torch.float16, torch.float32, True, None, True),
    (13, None, torch.bfloat16, torch.bfloat16, True, "silu", True),
    (16, None, torch.bfloat16, torch.float32, True, "silu", False),
]
IDS = [f"W{c[0]}-{c[1]}-{str(c[2])[6:]}-w{str(c[3])[6:]}-{'b' if c[4] else 'nob'}-{c[5]}-{'res' if c[6] else 'nores'}"
       for c in CASES]


def _mask(B, T, kind, device, gen):
    """None, or float32 `[B, T]`: ones, 0 over row 0's first third; "fractional": values in [0.25, 1.25) over
    steps [T/2, T/2 + 10) of every row as well."""
    if kind is None:
        return None
    mask = torch.ones(B, T)
    mask[0, : max(T // 3, 1)] = 0
    if kind == "fractional":
        stretch = mask[:, T // 2: T // 2 + 10]
        stretch.mul_(0.25 + torch.rand(stretch.shape, generator=gen))
    return mask.to(device)


def _inputs(B, T, D, W, dtype, wdtype, with_bias, mask_kind, device, gen):
    """x `[B, T, D]` with NaN and Inf where the mask is 0 (with a mask), weight, bias, mask."""
    x = randn(B, T, D, dtype=dtype, device=device, generator=gen)
    weight, bias = make_params(D, W, wdtype, device, gen, with_bias=with_bias)
    mask = _mask(B, T, mask_kind, device, gen)
    if mask is not None:
        x[0, 0, 1] = float("nan")
        x[0, max(T // 3, 1) - 1, D - 1] = float("inf")
    return x, weight, bias, mask


def _assert_matches(out, x, weight, bias, mask, activation, residual, name):
    """Element by element against the float64 oracle: the same non-finite entries (a masked NaN or Inf
    reaches only its own position, through the residual), the finite ones within one rounding."""
    ref, _ = oracle.short_conv_fused(x, weight, bias, mask, activation is not None, residual)
    ref, got = ref.cpu(), out.detach().cpu().double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), finite), \
        f"{name}: non-finite at {torch.nonzero(~torch.isfinite(got)).tolist()[:8]}, " \
        f"expected at {torch.nonzero(~finite).tolist()[:8]}"
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{name}: NaN pattern"
    err = (got - ref).abs()[finite]
    bound = (ATOL + RTOL[x.dtype] * ref.abs())[finite]
    bad = err > bound
    assert not bad.any(), f"{name}: {int(bad.sum())} of {bad.numel()} entries off, worst {err.max().item():.3e}"


def _run(btd, compiled, x, weight, bias, mask, activation, residual, out, name):
    """Launch through the launcher (a fresh plan) and return the defines it compiled with."""
    from causal_conv1d_mps import _activation

    code = _activation.code(activation)
    before = len(compiled)
    assert btd.conv_fwd_btd(x, weight, bias, mask, code, residual, out, allow_cpu=True), \
        btd.why_not(x, weight, bias, mask, code)
    assert len(compiled) == before + 1, "one plan, one variant per new signature"
    _assert_matches(out, x, weight, bias, mask, activation, residual, name)
    return compiled[-1]


@pytest.mark.parametrize("width,mask_kind,dtype,wdtype,with_bias,activation,residual", CASES, ids=IDS)
def test_each_scheme_matches_oracle(btd, compiled, device, width, mask_kind, dtype, wdtype, with_bias, activation,
                                    residual):
    gen = seeded(70 + width)
    has_mask = mask_kind is not None
    for B, T, D in ((2, 100, 12), (2, 3, 12), (1, 70, 260)):  # interior runs; T < W; B = 1, D past a block
        x, weight, bias, mask = _inputs(B, T, D, width, dtype, wdtype, with_bias, mask_kind, device, gen)
        out = torch.full_like(x, float("nan"))
        name = f"W{width} B{B} T{T} D{D}"
        defines = _run(btd, compiled, x, weight, bias, mask, activation, residual, out, name)
        vec, run, inside = btd.forward_variant(has_mask, width, True)
        assert (defines["CC_D"], defines["CC_FWD_VEC"], defines["CC_FWD_RUN"], defines["CC_FWD_INSIDE"]) == \
            (D, vec, run, int(inside)), name

    # the T = 100 input again as a strided view (runtime strides), into a strided out
    x, weight, bias, mask = _inputs(2, 100, 12, width, dtype, wdtype, with_bias, mask_kind, device, gen)
    canvas = torch.zeros(2, 203, 20, dtype=dtype, device=device)
    view = canvas[:, 2:202:2, 4:16]  # B stride 203 * 20, T stride 40, offset 44 elements (88 bytes)
    view.copy_(x)
    out_canvas = torch.full((2, 102, 16), float("nan"), dtype=dtype, device=device)
    out = out_canvas[:, 1:101, 4:]
    defines = _run(btd, compiled, view, weight, bias, mask, activation, residual, out, f"W{width} strided")
    vec, run, inside = btd.forward_variant(has_mask, width, False)
    assert (defines["CC_D"], defines["CC_FWD_VEC"], defines["CC_FWD_RUN"], defines["CC_FWD_INSIDE"]) == \
        (0, vec, run, int(inside))
    outside = out_canvas.clone()
    outside[:, 1:101, 4:] = 0
    assert torch.isnan(outside[:, 0]).all() and torch.isnan(outside[:, 101]).all(), "wrote outside out's steps"
    assert torch.isnan(outside[:, :, :4]).all(), "wrote outside out's channels"


def test_the_cases_reach_every_scheme_on_both_sides_of_each_switch(btd):
    """The cases above reach every variant `forward_variant` picks (D compiled in or not, with a mask or
    not), each width on either side of a switch; the widths measured faster than Triton stay 2..16 with and
    without a mask."""
    def variants(has_mask, d_const, widths):
        return {btd.forward_variant(has_mask, W, d_const) for W in widths}

    everything = range(1, btd.MAX_WIDTH + 1)
    for has_mask in (False, True):
        widths = [c[0] for c in CASES if (c[1] is not None) == has_mask]
        for d_const in (False, True):
            assert variants(has_mask, d_const, widths) == variants(has_mask, d_const, everything)
            for W in range(1, btd.MAX_WIDTH):  # a switch between W and W + 1: both are cases
                if btd.forward_variant(has_mask, W, d_const) != btd.forward_variant(has_mask, W + 1, d_const):
                    assert W in widths and W + 1 in widths, (has_mask, d_const, W)
    for has_mask in (False, True):
        for W in everything:
            vec, run, _ = btd.forward_variant(has_mask, W, True)
            assert (vec, run) in {(4, 8), (2, 16), (2, 32)}
    assert btd.MEASURED_FASTER == {(m, W) for m in (False, True) for W in range(2, btd.MAX_WIDTH + 1)}


def test_all_ones_and_fractional_runs_in_one_call(btd, compiled, device):
    """Runs whose mask values are all 1 take the vote's fast path, their neighbours the general one, in the
    same launch; a mask value that is not 0 or 1 anywhere in a run's rows or halo must send it down the
    general path, its halo included (W 4: 4 x 8; W 8: 2 x 32 with interior runs)."""
    gen = seeded(80)
    for W in (4, 8):
        x = randn(3, 160, 8, dtype=torch.bfloat16, device=device, generator=gen)
        weight, bias = make_params(8, W, torch.float32, device, gen)
        mask = torch.ones(3, 160)
        mask[0, 70] = 0.5   # inside an interior run (of 32 steps and of 8)
        mask[1, 127] = 3.0  # the last step of a run, and the halo of the next (both lengths)
        mask[2, 150:] = 0   # the last run: 0 and 1 only
        out = torch.full_like(x, float("nan"))
        _run(btd, compiled, x, weight, bias, mask.to(device), "silu", True, out, f"W{W}")

