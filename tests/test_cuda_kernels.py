"""The CUDA C++ kernels (`causal_conv1d_mps/cuda/kernels/conv_bdt.cu`) against the float64 oracle.

On `--device cpu` the shipped source runs through `cuda_harness` (compiled as C++, run on the CPU); on
`--device cuda` through NVRTC on the GPU. The same launchers serve both (`allow_cpu=True` lets them take CPU
tensors). Covered: every width 1..10, 16 and 17, both 16-bit dtypes, float32 weights, bias or none, identity and SiLU,
T of one vector, of several passes and of several backward chunks, odd D, B = 1 (whose backward writes its
gradients in one launch), strided views, the NaN
pattern of the weight gradient, determinism, where the kernels do not apply, the dispatch from the public
API, and the fall-back to the Triton kernels when the source does not compile. The launch plans: a call
differing from a planned one in any part of the signature, misaligned views, the environment switch, the
bounded tables; the prepared driver launch against stand-ins of `cuLaunchKernel` (Python and C).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
import warnings

import pytest
import torch

import oracle
from conftest import (RecordingDriver, assert_close_rel, leaf, leaf64, make_params, randn, seeded,
                      skip_unless_cuda_kernel, stand_in_cuda_driver)


@pytest.fixture
def kernels(device):
    """The launchers, on a device where the kernels can run (skips with the reason otherwise)."""
    from causal_conv1d_mps.cuda import launch

    skip_unless_cuda_kernel(device, "cc_conv_fwd_bdt", CC_VPT=2, CC_FWD_THREADS=128)
    return launch


def _run(launch, x, weight, bias, activation, dout):
    from causal_conv1d_mps import _activation

    code = _activation.code(activation)
    out = launch.conv_fwd_bdt(x, weight, bias, code, allow_cpu=True)
    grads = launch.conv_bwd_bdt(x, weight, bias, dout, code, allow_cpu=True)
    assert out is not None and grads is not None, launch.why_not(x, weight, bias, code)
    return out, grads


def _check_against_oracle(launch, x, weight, bias, activation, dout, name):
    out, (dx, dweight, dbias) = _run(launch, x, weight, bias, activation, dout)
    x64, w64, b64 = leaf64(x), leaf64(weight), leaf64(bias)
    ref, _ = oracle.causal_conv1d(x64, w64, b64, activation)
    ref.backward(dout.cpu().double())
    dtype = x.dtype
    assert_close_rel(out, ref, dtype, f"{name} out")
    assert_close_rel(dx, x64.grad, dtype, f"{name} dx")
    assert_close_rel(dweight, w64.grad, dtype, f"{name} dweight")
    if bias is not None:
        assert_close_rel(dbias, b64.grad, dtype, f"{name} dbias")
    else:
        assert dbias is None


# (W, x dtype, weight dtype, bias, activation): every width, each other option met at several widths
CASES = [
    (1, torch.bfloat16, torch.bfloat16, True, "silu"),
    (2, torch.float16, torch.float32, False, None),
    (3, torch.bfloat16, torch.float32, True, None),
    (4, torch.bfloat16, torch.bfloat16, True, "silu"),
    (4, torch.float16, torch.float16, False, "silu"),
    (5, torch.float16, torch.float32, True, "silu"),
    (6, torch.bfloat16, torch.bfloat16, False, None),
    (7, torch.bfloat16, torch.float32, True, "silu"),
    (8, torch.float16, torch.float16, True, None),
    (9, torch.bfloat16, torch.bfloat16, True, "silu"),
    (10, torch.float16, torch.float32, True, "silu"),
    (16, torch.bfloat16, torch.float32, True, "silu"),
    (17, torch.float16, torch.float16, False, None),
]


@pytest.mark.parametrize("width,dtype,wdtype,with_bias,activation", CASES,
                         ids=[f"W{c[0]}-{str(c[1])[6:]}-w{str(c[2])[6:]}-{'bias' if c[3] else 'nobias'}-{c[4]}"
                              for c in CASES])
def test_forward_backward_match_oracle(kernels, device, width, dtype, wdtype, with_bias, activation):
    gen = seeded(width)
    # T = 4176: several blocks of the forward (2048 or, from W = 9, 4096 steps each), a last one partly past T,
    # and several chunks in the backward (B * D small); T = 2064: 64-thread blocks of 4 vectors from W = 9
    for B, D, T in ((2, 3, 4176), (1, 2, 2064), (1, 5, 8), (3, 1, 24)):
        weight, bias = make_params(D, width, wdtype, device, gen, with_bias)
        x = randn(B, D, T, dtype=dtype, device=device, generator=gen)
        dout = randn(B, D, T, dtype=dtype, device=device, generator=gen)
        _check_against_oracle(kernels, x, weight, bias, activation, dout, f"B{B} D{D} T{T}")


def test_the_backward_reduces_partial_sums_only_where_a_channel_has_several(kernels, device):
    """The oracle cases above run both kinds of backward plan: B = 1 with one chunk (T <= 1024, or D large
    enough to fill the GPU alone) writes the gradients in its one launch; several rows of partial sums per
    channel (B > 1, or several chunks) are summed by the reduction launch."""
    from causal_conv1d_mps import _activation

    gen = seeded(5)
    for (B, D, T), direct in (((1, 5, 8), True), ((1, 2, 1024), True), ((1, 1024, 4096), True),
                              ((1, 2, 2064), False), ((2, 3, 4176), False), ((3, 1, 24), False)):
        weight, bias = make_params(D, 4, torch.bfloat16, device, gen)
        x = randn(B, D, T, dtype=torch.bfloat16, device=device, generator=gen)
        plan = kernels._plan_backward(x, weight, bias, x, _activation.SILU)
        assert (plan.reduce is None, plan.partials == 0) == (direct, direct), (B, D, T)


def test_a_one_launch_backward_over_several_passes_matches_oracle(kernels, device, monkeypatch):
    """The one-launch backward of a block that walks several passes of its row, the last one partly past T
    (as B = 1 with D >= 1024 does on a GPU): here one chunk per row is forced by a target of one block."""
    monkeypatch.setattr(kernels, "_TARGET_BLOCKS", 1)
    monkeypatch.setattr(kernels, "_backward_plans", {})
    gen = seeded(11)
    for with_bias in (True, False):
        weight, bias = make_params(3, 4, torch.float32, device, gen, with_bias)
        x = randn(1, 3, 2064, dtype=torch.bfloat16, device=device, generator=gen)
        dout = randn(1, 3, 2064, dtype=torch.bfloat16, device=device, generator=gen)
        _check_against_oracle(kernels, x, weight, bias, "silu", dout, f"bias {with_bias}")
    assert all(plan.reduce is None for plan in kernels._backward_plans.values())


def test_the_oracle_cases_reach_every_layout_of_the_forward(kernels):
    """The shapes above run the forward with each (vectors per thread, threads per block) the launcher picks:
    T = 4176 128-thread blocks of 2 (W < 9) and 4 vectors; T = 2064 64-thread blocks of 4 vectors from W = 9
    (a 128-thread block of 4 would span 4096 steps); T = 8 and 24 64-thread blocks of 2."""
    assert [kernels.forward_layout(4176, W) for W in (8, 9, 17)] == [(2, 128), (4, 128), (4, 128)]
    assert [kernels.forward_layout(2064, W) for W in (8, 9, 17)] == [(2, 128), (4, 64), (4, 64)]
    assert [kernels.forward_layout(T, W) for T in (8, 24) for W in (4, 9)] == [(2, 64)] * 4
    layouts = {kernels.forward_layout(T, W) for T in (4176, 2064, 8, 24) for W in range(1, 18)}
    assert layouts == {kernels.forward_layout(T, W) for T in range(8, 20000, 8) for W in range(1, 18)}


def test_strided_views(kernels, device):
    """Every other channel of a wider tensor, and a batch slice: strides over B and D taken as given."""
    gen = seeded(3)
    weight, bias = make_params(4, 4, torch.bfloat16, device, gen)
    wide = randn(3, 8, 48, dtype=torch.bfloat16, device=device, generator=gen)
    x = wide[1:, ::2]
    assert not x.is_contiguous()
    dout = randn(2, 4, 48, dtype=torch.bfloat16, device=device, generator=gen)
    _check_against_oracle(kernels, x, weight, bias, "silu", dout, "strided")


def test_nan_pattern_of_the_gradients_follows_the_oracle(kernels, device):
    """A NaN gradient at t = 0 reaches the weight taps that read the zeros before the start (0 * NaN), as in
    the reference; a NaN input at the last step reaches only the outputs that read it, not the rows past T."""
    from causal_conv1d_mps import _activation

    gen = seeded(5)
    B, D, T, W = 1, 2, 16, 4
    weight, bias = make_params(D, W, torch.bfloat16, device, gen)
    x = randn(B, D, T, dtype=torch.bfloat16, device=device, generator=gen)
    x[0, 1, T - 1] = float("nan")
    dout = randn(B, D, T, dtype=torch.bfloat16, device=device, generator=gen)
    dout[0, 0, 0] = float("nan")
    out = kernels.conv_fwd_bdt(x, weight, bias, _activation.SILU, allow_cpu=True)
    dx, dweight, dbias = kernels.conv_bwd_bdt(x, weight, bias, dout, _activation.SILU, allow_cpu=True)
    x64, w64, b64 = leaf64(x), leaf64(weight), leaf64(bias)
    ref, _ = oracle.causal_conv1d(x64, w64, b64, "silu")
    ref.backward(dout.cpu().double())
    for got, want, name in ((out, ref, "out"), (dx, x64.grad, "dx"), (dweight, w64.grad, "dweight"),
                            (dbias, b64.grad, "dbias")):
        assert torch.equal(torch.isnan(got.cpu()), torch.isnan(want)), name
    assert torch.isnan(dweight[0]).all()  # every tap of channel 0 read a zero or x[0] against dout[0]


def test_backward_is_deterministic(kernels, device):
    from causal_conv1d_mps import _activation

    gen = seeded(7)
    weight, bias = make_params(3, 4, torch.float32, device, gen)
    x = randn(2, 3, 2064, dtype=torch.bfloat16, device=device, generator=gen)
    dout = randn(2, 3, 2064, dtype=torch.bfloat16, device=device, generator=gen)
    first = kernels.conv_bwd_bdt(x, weight, bias, dout, _activation.SILU, allow_cpu=True)
    second = kernels.conv_bwd_bdt(x, weight, bias, dout, _activation.SILU, allow_cpu=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_where_the_kernels_do_not_apply(device):
    """Each excluded case is named, and the launchers return None for it (the Triton kernels serve)."""
    from causal_conv1d_mps import _activation
    from causal_conv1d_mps.cuda import launch

    silu = _activation.SILU
    w = torch.randn(4, 4, dtype=torch.bfloat16)
    x = torch.randn(2, 4, 64, dtype=torch.bfloat16)
    assert launch.why_not(x, w, None, silu) is None
    excluded = {
        "float32 x": (x.float(), w.float(), None),
        "T not a multiple of 8": (x[..., :60], w, None),
        "W = 18": (x, torch.randn(4, 18, dtype=torch.bfloat16), None),
        "channel-last": (x.transpose(1, 2).contiguous().transpose(1, 2), w, None),
        "not 16-byte aligned": (torch.randn(2 * 4 * 64 + 1, dtype=torch.bfloat16)[1:].view(2, 4, 64), w, None),
        "bias of another dtype": (x, w, torch.randn(4)),
        "float16 weight for bfloat16 x": (x, w.half(), None),
    }
    for name, (xx, ww, bb) in excluded.items():
        assert launch.why_not(xx, ww, bb, silu) is not None, name
        assert launch.conv_fwd_bdt(xx, ww, bb, silu, allow_cpu=True) is None, name
    # CPU tensors only when a test asks for the harness
    assert launch.conv_fwd_bdt(x, w, None, silu) is None


@pytest.fixture
def served(kernels, monkeypatch):
    """The Triton backend forced, the CUDA C++ launchers let through to CPU tensors (the harness), and the
    list of ("fwd" | "bwd", whether they served) of every call the backend made to them."""
    from causal_conv1d_mps.cuda import launch

    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "triton")
    calls = []

    def spy(fn, name):
        def wrapped(*args, **kwargs):
            result = fn(*args, **{**kwargs, "allow_cpu": True})
            calls.append((name, result is not None))
            return result
        return wrapped

    monkeypatch.setattr(launch, "conv_fwd_bdt", spy(launch.conv_fwd_bdt, "fwd"))
    monkeypatch.setattr(launch, "conv_bwd_bdt", spy(launch.conv_bwd_bdt, "bwd"))
    return calls


def test_public_api_dispatches_to_them(served, device):
    """`causal_conv1d` through the Triton backend takes the CUDA C++ kernels where they apply (here CPU
    tensors are let through to the harness), and still matches the oracle, forward and backward."""
    import causal_conv1d_mps as ccmps

    gen = seeded(11)
    weight, bias = make_params(6, 4, torch.bfloat16, device, gen)
    x = randn(2, 6, 32, dtype=torch.bfloat16, device=device, generator=gen)
    dout = randn(2, 6, 32, dtype=torch.bfloat16, device=device, generator=gen)
    xl, wl, bl = leaf(x), leaf(weight), leaf(bias)
    out = ccmps.causal_conv1d(xl, wl, bl, "silu")
    out.backward(dout)
    assert served == [("fwd", True), ("bwd", True)]
    x64, w64, b64 = leaf64(x), leaf64(weight), leaf64(bias)
    ref, _ = oracle.causal_conv1d(x64, w64, b64, "silu")
    ref.backward(dout.cpu().double())
    assert_close_rel(out, ref, torch.bfloat16, "out")
    assert_close_rel(xl.grad, x64.grad, torch.bfloat16, "dx")
    assert_close_rel(wl.grad, w64.grad, torch.bfloat16, "dweight")
    assert_close_rel(bl.grad, b64.grad, torch.bfloat16, "dbias")


def test_a_source_that_does_not_compile_falls_back_with_one_warning(kernels, device, monkeypatch):
    from causal_conv1d_mps import _activation
    from causal_conv1d_mps.cuda import _runtime, _source

    monkeypatch.setattr(_runtime, "_kernels", {})
    monkeypatch.setattr(_runtime, "_failed", {})
    monkeypatch.setattr(kernels, "_forward_plans", {})  # a plan made earlier holds a compiled kernel
    monkeypatch.setattr(_source, "_text", lambda file_name: "this is not C++;\n")
    x = torch.randn(1, 2, 16, dtype=torch.bfloat16, device=device)
    w = torch.randn(2, 4, dtype=torch.bfloat16, device=device)
    with pytest.warns(RuntimeWarning, match="the Triton kernels serve"):
        assert kernels.conv_fwd_bdt(x, w, None, _activation.SILU, allow_cpu=True) is None
    assert "conv_bdt.cu" in _runtime.unavailable_reason(device)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert kernels.conv_fwd_bdt(x, w, None, _activation.SILU, allow_cpu=True) is None
    assert not again, "one warning per process, not one per call"


def test_generated_header_comes_from_the_registry():
    from causal_conv1d_mps import _activation
    from causal_conv1d_mps.cuda import _source

    defines = dict(CC_W=4, CC_X_BF16=1, CC_WT=2, CC_HAS_BIAS=1, CC_ACTIVATION=_activation.SILU)
    text = _source.header(defines)
    for a in _activation.ACTIVATIONS:
        assert f"#define CC_ACTIVATION_{a.name.upper()} {a.code}\n" in text
    assert "#define CC_W 4\n" in text
    with pytest.raises(ValueError, match="CC_W"):
        _source.header({**defines, "CC_W": 18})
    with pytest.raises(ValueError, match="expected"):
        _source.header({"CC_W": 4})


def test_public_api_with_final_states_mixes_kernels_correctly(served, device):
    """The CUDA C++ forward with final states gathered by the Triton kernel, and a backward that carries a
    final-state gradient (which the CUDA C++ backward does not take: Triton serves it), against the oracle."""
    import causal_conv1d_mps as ccmps

    gen = seeded(13)
    weight, bias = make_params(5, 4, torch.float32, device, gen)
    x = randn(2, 5, 24, dtype=torch.float16, device=device, generator=gen)
    dout = randn(2, 5, 24, dtype=torch.float16, device=device, generator=gen)
    dfinal = randn(2, 5, 3, dtype=torch.float16, device=device, generator=gen)
    xl, wl, bl = leaf(x), leaf(weight), leaf(bias)
    out, final = ccmps.causal_conv1d(xl, wl, bl, "silu", return_final_states=True)
    torch.autograd.backward((out, final), (dout, dfinal))
    assert served == [("fwd", True)], served  # the backward with a final-state gradient is Triton's
    x64, w64, b64 = leaf64(x), leaf64(weight), leaf64(bias)
    ref, ref_final = oracle.causal_conv1d(x64, w64, b64, "silu")
    torch.autograd.backward((ref, ref_final), (dout.cpu().double(), dfinal.cpu().double()))
    assert_close_rel(out, ref, torch.float16, "out")
    assert_close_rel(final, ref_final, torch.float16, "final states")
    assert_close_rel(xl.grad, x64.grad, torch.float16, "dx")
    assert_close_rel(wl.grad, w64.grad, torch.float16, "dweight")
    assert_close_rel(bl.grad, b64.grad, torch.float16, "dbias")


# ------------------------------------------------------------------------------------------ launch plans
# Each launcher keeps a plan per call signature (kernels, grid, block, integer arguments); a call whose
# signature differs in any part must get its own plan, never a stale one.

def _signature_variants(device):
    """(name, x, weight, bias, activation, dout): a base call, then calls that each differ from it in one
    part of the signature only (the same values where the part allows)."""
    gen = seeded(17)
    B, D, T, W = 2, 4, 32, 4
    x = randn(B, D, T, dtype=torch.bfloat16, device=device, generator=gen)
    dout = randn(B, D, T, dtype=torch.bfloat16, device=device, generator=gen)
    weight, bias = make_params(D, W, torch.float32, device, gen)
    wide = randn(B, 2 * D, T, dtype=torch.bfloat16, device=device, generator=gen)
    wide[:, ::2] = x
    dout_wide = randn(2 * B, D, T, dtype=torch.bfloat16, device=device, generator=gen)
    dout_wide[::2] = dout
    bias_wide = randn(2 * D, dtype=torch.float32, device=device, generator=gen)
    bias_wide[::2] = bias
    w5, _ = make_params(D, W + 1, torch.float32, device, gen)

    def other(t):
        return randn(*t.shape, dtype=t.dtype, device=device, generator=gen)

    long = other(x.repeat(1, 1, 2))
    return [
        ("base", x, weight, bias, "silu", dout),
        ("x strides over D (same shape)", wide[:, ::2], weight, bias, "silu", dout),
        ("dout strides over B (same shape)", x, weight, bias, "silu", dout_wide[::2]),
        ("x shape (T)", long, weight, bias, "silu", other(long)),
        ("x shape (B)", x[:1], weight, bias, "silu", dout[:1]),
        ("x dtype", x.half(), weight, bias, "silu", dout.half()),
        ("weight strides (same shape)", x, weight.t().contiguous().t(), bias, "silu", dout),
        ("weight dtype", x, weight.bfloat16(), bias.bfloat16(), "silu", dout),
        ("width", x, w5, bias, "silu", dout),
        ("no bias", x, weight, None, "silu", dout),
        ("bias strides", x, weight, bias_wide[::2], "silu", dout),
        ("activation", x, weight, bias, None, dout),
    ]


def test_launch_plans_follow_every_part_of_the_signature(kernels, device):
    """Every variant after the base call (and the base again after all of them) matches the oracle, with
    and without bias (the two keys are built apart)."""
    variants = _signature_variants(device)
    for name, x, weight, bias, activation, dout in variants + variants[:1]:
        _check_against_oracle(kernels, x, weight, bias, activation, dout, name)
        if bias is not None and name != "bias strides":
            _check_against_oracle(kernels, x, weight, None, activation, dout, f"{name}, no bias")


def test_a_misaligned_x_or_dout_is_refused_though_its_signature_has_a_plan(kernels, device):
    """Alignment is each call's: a tensor of a planned signature at an address 2 bytes past a multiple of 16
    is refused (the Triton kernels serve it), the aligned one still served."""
    from causal_conv1d_mps import _activation

    silu = _activation.SILU
    gen = seeded(23)
    weight, bias = make_params(4, 4, torch.bfloat16, device, gen)
    n = 2 * 4 * 32
    storage = randn(n + 16, dtype=torch.bfloat16, device=device, generator=gen)
    aligned, misaligned = storage[8:8 + n].view(2, 4, 32), storage[1:1 + n].view(2, 4, 32)
    assert aligned.stride() == misaligned.stride() and aligned.data_ptr() % 16 == 0
    dout = randn(2, 4, 32, dtype=torch.bfloat16, device=device, generator=gen)
    assert kernels.conv_fwd_bdt(aligned, weight, bias, silu, allow_cpu=True) is not None
    assert kernels.conv_bwd_bdt(aligned, weight, bias, dout, silu, allow_cpu=True) is not None
    assert kernels.conv_fwd_bdt(misaligned, weight, bias, silu, allow_cpu=True) is None
    assert kernels.conv_bwd_bdt(misaligned, weight, bias, dout, silu, allow_cpu=True) is None
    assert kernels.conv_bwd_bdt(aligned, weight, bias, misaligned, silu, allow_cpu=True) is None
    assert kernels.why_not(misaligned, weight, bias, silu) is not None
    _check_against_oracle(kernels, aligned, weight, bias, "silu", dout, "aligned again")


def test_a_misaligned_x_falls_back_to_triton_through_the_public_api(served, device):
    import causal_conv1d_mps as ccmps

    gen = seeded(29)
    weight, bias = make_params(3, 4, torch.bfloat16, device, gen)
    storage = randn(3 * 16 + 8, dtype=torch.bfloat16, device=device, generator=gen)
    aligned, misaligned = storage[8:8 + 48].view(1, 3, 16), storage[1:1 + 48].view(1, 3, 16)
    for x in (aligned, misaligned):
        out = ccmps.causal_conv1d(x, weight, bias, "silu")
        ref, _ = oracle.causal_conv1d(leaf64(x), leaf64(weight), leaf64(bias), "silu")
        assert_close_rel(out, ref, torch.bfloat16, f"x at {x.data_ptr() % 16} bytes past 16")
    assert served == [("fwd", True), ("fwd", False)]


def test_the_plan_tables_are_bounded(kernels, device, monkeypatch):
    from causal_conv1d_mps import _activation

    monkeypatch.setattr(kernels, "_MAX_PLANS", 3)
    monkeypatch.setattr(kernels, "_forward_plans", {})
    monkeypatch.setattr(kernels, "_backward_plans", {})
    gen = seeded(31)
    weight, bias = make_params(2, 3, torch.bfloat16, device, gen)
    for T in (8, 16, 24, 32, 40, 8):
        x = randn(1, 2, T, dtype=torch.bfloat16, device=device, generator=gen)
        dout = randn(1, 2, T, dtype=torch.bfloat16, device=device, generator=gen)
        _check_against_oracle(kernels, x, weight, bias, "silu", dout, f"T {T}")
        assert len(kernels._forward_plans) <= 3 and len(kernels._backward_plans) <= 3
    # a signature the kernels do not take is remembered too, in the same bounded table
    assert kernels.conv_fwd_bdt(x[..., :5], weight, bias, _activation.SILU, allow_cpu=True) is None
    assert None in kernels._forward_plans.values() and len(kernels._forward_plans) <= 3


def test_turning_the_kernels_off_takes_effect_on_a_planned_signature(kernels, device, monkeypatch):
    from causal_conv1d_mps import _activation

    gen = seeded(37)
    weight, bias = make_params(2, 4, torch.bfloat16, device, gen)
    x = randn(1, 2, 16, dtype=torch.bfloat16, device=device, generator=gen)
    assert kernels.conv_fwd_bdt(x, weight, bias, _activation.SILU, allow_cpu=True) is not None
    monkeypatch.setenv("CAUSAL_CONV1D_CUDA_KERNELS", "0")
    assert kernels.conv_fwd_bdt(x, weight, bias, _activation.SILU, allow_cpu=True) is None
    assert kernels.conv_bwd_bdt(x, weight, bias, x, _activation.SILU, allow_cpu=True) is None
    monkeypatch.setenv("CAUSAL_CONV1D_CUDA_KERNELS", "1")
    assert kernels.conv_fwd_bdt(x, weight, bias, _activation.SILU, allow_cpu=True) is not None


# ------------------------------------------------------------------- the driver launch, with a stand-in
# What `_runtime` hands to `cuLaunchKernel`, checked on the CPU: the driver call replaced by a recorder
# that reads the arguments back through `kernelParams` as the driver would.

@pytest.fixture
def driver(monkeypatch):
    """A `_DriverKernel` on device 0 of a stand-in driver: the current device and stream are settable."""
    from causal_conv1d_mps.cuda import _runtime

    class Compiled:
        func = ctypes.c_void_p(0x1230)

    state = {"device": 0, "stream": 0x5000}
    monkeypatch.setattr(_runtime, "_libcuda", object())  # loaded: nothing is looked up in it
    monkeypatch.setattr(_runtime, "_launch_kernel", object())
    monkeypatch.setattr(_runtime, "_current_device", lambda: state["device"])
    monkeypatch.setattr(_runtime, "_current_stream", lambda index: state["stream"] + index)
    return _runtime._DriverKernel(Compiled(), 0), state


def test_a_compile_makes_the_devices_primary_context_current_first(monkeypatch):
    """The first call of a kernel may be a backward, on autograd's device thread, which has no current driver
    context: loading the compiled module there failed ("invalid device context", found on an H200) and turned
    the kernels off for the process. The compile makes the device's primary context current before loading."""
    import contextlib

    from causal_conv1d_mps import _activation
    from causal_conv1d_mps.cuda import _runtime

    events = []

    class Compiled:
        func = ctypes.c_void_p(0x1230)

    def compile_kernel(text, name, nvcc_options):
        events.append(("compile", name))
        return Compiled()

    monkeypatch.setattr(_runtime, "_libcuda", object())
    monkeypatch.setattr(_runtime, "_launch_kernel", object())
    monkeypatch.setattr(_runtime, "_make_primary_context_current", lambda index: events.append(("context", index)))
    monkeypatch.setattr(torch.cuda, "_compile_kernel", compile_kernel)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    defines = dict(CC_W=4, CC_X_BF16=1, CC_WT=0, CC_HAS_BIAS=1, CC_ACTIVATION=_activation.SILU)
    kernel = _runtime._compile("cc_conv_bwd_bdt", defines, torch.device("cuda", 3), 3)
    assert isinstance(kernel, _runtime._DriverKernel)
    assert events == [("context", 3), ("compile", "cc_conv_bwd_bdt")]


def test_a_prepared_launch_passes_pointers_then_its_ints(driver, monkeypatch):
    from causal_conv1d_mps.cuda import _runtime

    kernel, state = driver
    recorder = RecordingDriver(pointers=3, ints=4)
    monkeypatch.setattr(_runtime, "_launch_kernel", recorder)
    launch = kernel.prepare((5, 6, 7), (128, 1, 1), 3, (11, -2, 2**31 - 1, 0)).launch
    launch(0x7F0000001000, 0x10, 2**48 + 16)
    state["stream"] = 0x6000
    launch(1, 2, 3)
    first, second = recorder.launches
    assert first == dict(func=0x1230, grid=(5, 6, 7), block=(128, 1, 1), shared=0, stream=0x5000,
                         args=[0x7F0000001000, 0x10, 2**48 + 16, 11, -2, 2**31 - 1, 0], extra=None)
    assert second["stream"] == 0x6000 and second["args"] == [1, 2, 3, 11, -2, 2**31 - 1, 0]


def test_a_prepared_launch_retries_once_in_the_primary_context_and_raises_other_errors(driver, monkeypatch):
    from causal_conv1d_mps.cuda import _runtime

    kernel, _ = driver
    made_current = []
    monkeypatch.setattr(_runtime, "_make_primary_context_current", made_current.append)
    recorder = RecordingDriver(pointers=1, ints=1, results=[201, 0])
    monkeypatch.setattr(_runtime, "_launch_kernel", recorder)
    launch = kernel.prepare((1, 1, 1), (32, 1, 1), 1, (4,)).launch
    launch(0x100)  # CUDA_ERROR_INVALID_CONTEXT (an autograd device thread), then success
    assert made_current == [0] and [r["args"] for r in recorder.launches] == [[0x100, 4], [0x100, 4]]
    recorder.results = [201, 201]
    with pytest.raises(RuntimeError, match="CUDA error 201"):
        launch(0x100)
    recorder.results = [700]
    with pytest.raises(RuntimeError, match="CUDA error 700"):
        launch(0x100)
    assert made_current == [0, 0]


def test_a_prepared_launch_switches_to_its_device(driver, monkeypatch):
    """A kernel lives in its device's context: launched while another device is current, it makes its own
    current for the launch (and asks for that device's stream)."""
    from causal_conv1d_mps.cuda import _runtime

    kernel, state = driver
    state["device"] = 1
    switched = []

    @contextlib.contextmanager
    def device_guard(index):
        previous, state["device"] = state["device"], index
        switched.append(index)
        try:
            yield
        finally:
            state["device"] = previous

    monkeypatch.setattr(torch.cuda, "device", device_guard)
    recorder = RecordingDriver(pointers=1, ints=0)
    monkeypatch.setattr(_runtime, "_launch_kernel", recorder)
    kernel.prepare((1, 1, 1), (32, 1, 1), 1, ()).launch(0x100)
    assert switched == [0] and state["device"] == 1
    assert recorder.launches[0]["stream"] == 0x5000  # device 0's


def test_threads_sharing_a_prepared_launch_each_launch_their_own_pointers(driver, monkeypatch):
    """The argument buffer is shared: packing and launching happen under its lock, so a thread switch
    between them (forced here) cannot hand one thread's launch another thread's pointers."""
    from causal_conv1d_mps.cuda import _runtime

    kernel, _ = driver
    recorder = RecordingDriver(pointers=1, ints=1)
    monkeypatch.setattr(_runtime, "_launch_kernel", recorder)
    prepared = kernel.prepare((1, 1, 1), (32, 1, 1), 1, (9,))
    pack = prepared._pack

    def pack_then_yield(*args):
        pack(*args)
        time.sleep(0.0002)  # another thread runs between this thread's packing and its launch
    prepared._pack = pack_then_yield
    launch = prepared.launch
    pointers = [0x1000 * (i + 1) for i in range(4)]
    threads = [threading.Thread(target=lambda p=p: [launch(p) for _ in range(25)]) for p in pointers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    launched = sorted(r["args"][0] for r in recorder.launches)
    assert launched == sorted(pointers * 25)
    assert all(r["args"][1] == 9 for r in recorder.launches)


def test_the_launchers_hand_the_driver_what_they_hand_the_harness(kernels, device, monkeypatch):
    """On a GPU the launchers pass pointers to prepared driver launches; here (the harness takes tensors)
    the driver is stood in: each launch must carry the grid, block and integers of the harness launch that
    the oracle tests verify, and the pointers of the right tensors in the right slots."""
    from causal_conv1d_mps import _activation

    if device.type != "cpu":
        pytest.skip("the stand-in driver takes CPU tensors")
    silu = _activation.SILU
    gen = seeded(41)
    weight, bias = make_params(6, 5, torch.float32, device, gen)
    wide = randn(3, 12, 2064, dtype=torch.float16, device=device, generator=gen)
    x = wide[:, ::2]  # strides over B and D that differ from dx's and dout's
    dout = randn(3, 6, 2064, dtype=torch.float16, device=device, generator=gen)

    def harness_launches():
        kernels.conv_fwd_bdt(x, weight, bias, silu, allow_cpu=True)
        kernels.conv_bwd_bdt(x, weight, bias, dout, silu, allow_cpu=True)
        (fwd,), (bwd,) = kernels._forward_plans.values(), kernels._backward_plans.values()
        return [(p.__self__._grid, p.__self__._block, p.__self__._ints) for p in (fwd.launch, bwd.conv, bwd.reduce)]

    monkeypatch.setattr(kernels, "_forward_plans", {})
    monkeypatch.setattr(kernels, "_backward_plans", {})
    expected = harness_launches()

    counts = {"cc_conv_fwd_bdt": (4, 8), "cc_conv_bwd_bdt": (8, 13), "cc_reduce_partials": (3, 2)}
    handles = {name: 0x100 * (i + 1) for i, name in enumerate(counts)}
    recorders = {handles[name]: RecordingDriver(*n) for name, n in counts.items()}

    launches = []
    stand_in_cuda_driver(monkeypatch, lambda *args: (
        recorders[args[0].value](*args), launches.append(recorders[args[0].value].launches[-1]))[0],
        handles=handles, stream=0x77)
    monkeypatch.setattr(kernels, "_forward_plans", {})
    monkeypatch.setattr(kernels, "_backward_plans", {})
    out = kernels.conv_fwd_bdt(x, weight, bias, silu, allow_cpu=True)
    dx, dweight, dbias = kernels.conv_bwd_bdt(x, weight, bias, dout, silu, allow_cpu=True)
    assert [r["func"] for r in launches] == [handles[name] for name in counts]
    for got, (grid, block, ints) in zip(launches, expected):
        n = len(got["args"]) - len(ints)
        assert (got["grid"], got["block"], got["args"][n:], got["stream"]) == (grid, block, ints, 0x77)
    fwd, conv, reduce = (r["args"] for r in launches)
    assert fwd[:4] == [t.data_ptr() for t in (x, weight, bias, out)]
    assert conv[:5] == [t.data_ptr() for t in (x, weight, bias, dout, dx)]
    assert conv[6:8] == [dweight.data_ptr(), dbias.data_ptr()]
    assert reduce[:3] == [conv[5], dweight.data_ptr(), dbias.data_ptr()]

    # one row per channel (B = 1, one chunk): one launch, which writes dweight and dbias itself
    launches.clear()
    one_row, dout_one = x[:1, :, :1024], dout[:1, :, :1024]
    dx, dweight, dbias = kernels.conv_bwd_bdt(one_row, weight, bias, dout_one, silu, allow_cpu=True)
    assert [r["func"] for r in launches] == [handles["cc_conv_bwd_bdt"]]
    (conv,) = (r["args"] for r in launches)
    assert conv[:8] == [t.data_ptr() for t in (one_row, weight, bias, dout_one, dx, dweight, dweight, dbias)]


RECORDING_DRIVER_SOURCE = """
void* seen_f; unsigned seen_dims[7]; void* seen_stream; void** seen_params; void** seen_extra; int calls;
int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared, void* stream, void** params, void** extra) {
    seen_f = f; seen_stream = stream; seen_params = params; seen_extra = extra; ++calls;
    seen_dims[0] = gx; seen_dims[1] = gy; seen_dims[2] = gz; seen_dims[3] = bx; seen_dims[4] = by;
    seen_dims[5] = bz; seen_dims[6] = shared;
    return calls == 1 ? 0 : 700;
}
"""


def test_a_prepared_launch_reaches_a_c_function_of_the_drivers_signature_intact(tmp_path, monkeypatch):
    """The ctypes call itself (no argtypes: ints as C int, pointers as ctypes objects, past the registers
    onto the stack) against a C function with `cuLaunchKernel`'s signature that keeps what it received."""
    import shutil
    import subprocess

    from causal_conv1d_mps.cuda import _runtime

    compiler = next((c for c in ("clang-16", "clang", "cc", "gcc") if shutil.which(c)), None)
    if compiler is None:
        pytest.skip("no C compiler")
    (tmp_path / "driver.c").write_text(RECORDING_DRIVER_SOURCE)
    subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-o", str(tmp_path / "libdriver.so"),
                    str(tmp_path / "driver.c")], check=True)
    lib = ctypes.CDLL(str(tmp_path / "libdriver.so"))
    monkeypatch.setattr(_runtime, "_libcuda", lib)
    monkeypatch.setattr(_runtime, "_launch_kernel", None)  # derived from `_libcuda` by `_load_driver`
    monkeypatch.setattr(_runtime, "_current_device", lambda: 0)
    monkeypatch.setattr(_runtime, "_current_stream", lambda index: 0x7F00DEADBEE0)

    class Compiled:
        func = ctypes.c_void_p(0x7F0012345670)

    launch = _runtime._DriverKernel(Compiled(), 0).prepare((70000, 65535, 3), (128, 1, 1), 2, (8, -1, 2**31 - 1))
    launch.launch(0x7FFF00000010, 2**63 + 16)
    assert ctypes.c_void_p.in_dll(lib, "seen_f").value == 0x7F0012345670
    assert list((ctypes.c_uint * 7).in_dll(lib, "seen_dims")) == [70000, 65535, 3, 128, 1, 1, 0]
    assert ctypes.c_void_p.in_dll(lib, "seen_stream").value == 0x7F00DEADBEE0
    assert ctypes.c_void_p.in_dll(lib, "seen_extra").value is None
    params = ctypes.cast(ctypes.c_void_p.in_dll(lib, "seen_params"), ctypes.POINTER(ctypes.c_void_p))
    values = [ctypes.c_uint64.from_address(params[i]).value for i in range(2)]
    values += [ctypes.c_int.from_address(params[2 + i]).value for i in range(3)]
    assert values == [0x7FFF00000010, 2**63 + 16, 8, -1, 2**31 - 1]
    with pytest.raises(RuntimeError, match="CUDA error 700"):  # the second call returns an error
        launch.launch(0x10, 0x20)


def test_the_backend_takes_the_cuda_forward_at_every_width(served, device):
    """Since v9 the CUDA C++ forward is the faster one at every width, narrow and long rows included
    (Triton's run kernel had tied it at W < 4, T >= 1024): the backend's forward and backward both take it."""
    import causal_conv1d_mps as ccmps

    gen = seeded(43)
    for W in (2, 3):
        weight, bias = make_params(2, W, torch.bfloat16, device, gen)
        x = randn(1, 2, 1024, dtype=torch.bfloat16, device=device, generator=gen)
        served.clear()
        xl = leaf(x)
        out = ccmps.causal_conv1d(xl, weight, bias, "silu")
        out.backward(torch.ones_like(out))
        assert served == [("fwd", True), ("bwd", True)], (W, served)
        ref, _ = oracle.causal_conv1d(leaf64(x), leaf64(weight), leaf64(bias), "silu")
        assert_close_rel(out, ref, torch.bfloat16, f"W{W} out")
