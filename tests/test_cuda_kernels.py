"""The CUDA C++ kernels (`causal_conv1d_mps/cuda/kernels/conv_bdt.cu`) against the float64 oracle.

On `--device cpu` the shipped source runs through `cuda_harness` (compiled as C++, run on the CPU); on
`--device cuda` through NVRTC on the GPU. The same launchers serve both (`allow_cpu=True` lets them take CPU
tensors). Covered: every width 1..10, 16 and 17, both 16-bit dtypes, float32 weights, bias or none, identity and SiLU,
T of one vector, of several passes and of several backward chunks, odd D, B = 1, strided views, the NaN
pattern of the weight gradient, determinism, where the kernels do not apply, the dispatch from the public
API, and the fall-back to the Triton kernels when the source does not compile.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import oracle
from conftest import assert_close_rel, leaf, leaf64, make_params, randn, seeded


@pytest.fixture
def kernels(device):
    """The launchers, on a device where the kernels can run (skips with the reason otherwise)."""
    from causal_conv1d_mps.cuda import _runtime, launch

    if device.type == "mps":
        pytest.skip("CUDA C++ kernels: not on mps")
    from causal_conv1d_mps import _activation

    probe = dict(CC_W=4, CC_X_BF16=1, CC_WT=0, CC_HAS_BIAS=1, CC_ACTIVATION=_activation.SILU)
    if _runtime.kernel("cc_conv_fwd_bdt", probe, device) is None:
        pytest.skip(f"CUDA C++ kernels on {device}: {_runtime.unavailable_reason(device)}")
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
        assert dbias.numel() == 0


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
    # T = 1040: two passes of 1024 steps in the forward, and several chunks in the backward (B * D small)
    for B, D, T in ((2, 3, 1040), (1, 5, 8), (3, 1, 24)):
        weight, bias = make_params(D, width, wdtype, device, gen, with_bias)
        x = randn(B, D, T, dtype=dtype, device=device, generator=gen)
        dout = randn(B, D, T, dtype=dtype, device=device, generator=gen)
        _check_against_oracle(kernels, x, weight, bias, activation, dout, f"B{B} D{D} T{T}")


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
