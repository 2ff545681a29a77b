"""The channel-last CUDA C++ forward (`causal_conv1d_mps/cuda/kernels/conv_btd.cu`) against the float64 oracle.

On `--device cpu` the shipped source runs through `cuda_harness` (compiled as C++, run on the CPU); on
`--device cuda` through NVRTC. Covered: every width 1..16, both 16-bit dtypes, float32 and 16-bit weights,
bias or none, identity and SiLU, masks (0/1, fractional, NaN inputs at masked positions), the residual,
T < W, T not a multiple of the run, D not a multiple of a block's channels, B = 1, strided views, where the
kernel does not apply, and the dispatch of the Triton backend (measured pairs only).
"""

from __future__ import annotations

import pytest
import torch

import oracle
from conftest import RecordingDriver, assert_close_rel, make_params, randn, seeded, stand_in_cuda_driver


@pytest.fixture
def btd(device):
    """The launcher module, on a device where the kernel can run (skips with the reason otherwise)."""
    from causal_conv1d_mps import _activation
    from causal_conv1d_mps.cuda import _runtime, launch_btd

    if device.type == "mps":
        pytest.skip("CUDA C++ kernels: not on mps")
    probe = dict(CC_W=4, CC_X_BF16=1, CC_WT=0, CC_HAS_BIAS=1, CC_ACTIVATION=_activation.SILU, CC_HAS_MASK=1,
                 CC_RESIDUAL=1)
    if _runtime.kernel("cc_conv_fwd_btd", probe, device) is None:
        pytest.skip(f"CUDA C++ kernels on {device}: {_runtime.unavailable_reason(device)}")
    return launch_btd


def _mask(B, T, device, kind, gen):
    """None, a 0/1 left-padding mask, or fractional values with zeros (float32 [B, T])."""
    if kind is None:
        return None
    mask = torch.ones(B, T, device=device)
    mask[0, : max(T // 3, 1)] = 0
    if kind == "fractional":
        mask = mask * (0.25 + torch.rand(B, T, generator=gen).to(device))
    return mask


def _check(btd, x, weight, bias, mask, activation, residual, name):
    from causal_conv1d_mps import _activation

    code = _activation.code(activation)
    out = torch.full_like(x, float("nan")).contiguous()
    assert btd.conv_fwd_btd(x, weight, bias, mask, code, residual, out, allow_cpu=True), \
        btd.why_not(x, weight, bias, mask, code)
    ref, _ = oracle.short_conv_fused(x, weight, bias, mask, activation is not None, residual)
    assert_close_rel(out, ref, x.dtype, name)
    return out


# (W, x dtype, weight dtype, bias, activation, mask, residual): every width, each option at several widths
CASES = [
    (1, torch.bfloat16, torch.bfloat16, True, "silu", "binary", True),
    (2, torch.float16, torch.float32, False, None, None, False),
    (3, torch.bfloat16, torch.float32, True, "silu", "binary", True),
    (4, torch.bfloat16, torch.bfloat16, True, "silu", None, False),
    (4, torch.float16, torch.float16, False, "silu", "fractional", True),
    (5, torch.float16, torch.float32, True, None, "binary", False),
    (6, torch.bfloat16, torch.bfloat16, False, "silu", None, True),
    (7, torch.bfloat16, torch.float32, True, "silu", "binary", True),
    (8, torch.float16, torch.float16, True, None, None, False),
    (9, torch.bfloat16, torch.bfloat16, True, "silu", "fractional", False),
    (10, torch.float16, torch.float32, True, "silu", None, True),
    (11, torch.float16, torch.float16, False, None, "binary", True),
    (12, torch.bfloat16, torch.bfloat16, True, "silu", None, False),
    (13, torch.float16, torch.float32, False, "silu", "binary", False),
    (14, torch.bfloat16, torch.float32, True, None, None, True),
    (15, torch.float16, torch.float16, True, "silu", "fractional", True),
    (16, torch.bfloat16, torch.float32, True, "silu", "binary", True),
]


@pytest.mark.parametrize("width,dtype,wdtype,with_bias,activation,mask_kind,residual", CASES,
                         ids=[f"W{c[0]}-{str(c[1])[6:]}-w{str(c[2])[6:]}-{'b' if c[3] else 'nob'}-{c[4]}-{c[5]}"
                              f"-{'res' if c[6] else 'nores'}" for c in CASES])
def test_matches_oracle(btd, device, width, dtype, wdtype, with_bias, activation, mask_kind, residual):
    gen = seeded(40 + width)
    for B, T, D in ((2, 21, 12), (1, 3, 264)):  # T not a multiple of the run, T < W; D past one block
        x = randn(B, T, D, dtype=dtype, device=device, generator=gen)
        weight, bias = make_params(D, width, wdtype, device, gen, with_bias=with_bias)
        mask = _mask(B, T, device, mask_kind, gen)
        _check(btd, x, weight, bias, mask, activation, residual, f"W{width} B{B} T{T} D{D}")


def test_masked_nan_reaches_only_its_own_residual(btd, device):
    """A NaN input where the mask is 0 contributes nothing to the conv; the residual adds it back at its own
    position only (docs/CONTRACT.md, the NaN containment rules)."""
    gen = seeded(50)
    B, T, D, W = 2, 19, 8, 4
    x = randn(B, T, D, dtype=torch.bfloat16, device=device, generator=gen)
    weight, bias = make_params(D, W, torch.float32, device, gen)
    mask = torch.ones(B, T, device=device)
    mask[0, :5] = 0
    x[0, 2, 3] = float("nan")
    x[0, 4, 0] = float("inf")
    for residual in (False, True):
        out = torch.empty_like(x)
        assert btd.conv_fwd_btd(x, weight, bias, mask, 1, residual, out, allow_cpu=True)
        bad = ~torch.isfinite(out)
        expected = torch.zeros_like(bad)
        if residual:
            expected[0, 2, 3] = expected[0, 4, 0] = True
        assert torch.equal(bad.cpu(), expected.cpu()), torch.nonzero(bad).tolist()


def test_strided_views(btd, device):
    """x and out read and written in place whatever their B/T strides (multiples of 4 elements)."""
    gen = seeded(51)
    big = randn(3, 40, 24, dtype=torch.bfloat16, device=device, generator=gen)
    x = big[::2, 3:30, 8:20]  # B stride 2 * 40 * 24, T stride 24, D offset 8 (16 bytes)
    weight, bias = make_params(12, 5, torch.bfloat16, device, gen)
    mask = _mask(2, 27, device, "binary", gen)
    ref, _ = oracle.short_conv_fused(x, weight, bias, mask, True, True)
    canvas = torch.full((2, 30, 16), float("nan"), dtype=torch.bfloat16, device=device)
    out = canvas[:, 1:28, 4:16]
    assert btd.conv_fwd_btd(x, weight, bias, mask, 1, True, out, allow_cpu=True)
    assert_close_rel(out, ref, torch.bfloat16, "strided")
    untouched = canvas.clone()
    untouched[:, 1:28, 4:16] = 0
    assert torch.isnan(untouched[:, 0]).all() and torch.isnan(untouched[:, 28:]).all()
    assert torch.isnan(untouched[:, :, :4]).all(), "wrote outside out"


def test_where_it_does_not_apply(btd, device):
    from causal_conv1d_mps import _activation

    gen = seeded(52)
    x = randn(2, 9, 8, dtype=torch.bfloat16, device=device, generator=gen)
    w, b = make_params(8, 4, torch.bfloat16, device, gen)
    silu = _activation.SILU
    cases = {
        "float32 x": (x.float(), w.float(), b.float(), None),
        "D not a multiple of 4": (x[:, :, :6], w[:6], b[:6], None),
        "misaligned x": (x[:, :, 1:5], w[:4], b[:4], None),
        "W = 17": (x, make_params(8, 17, torch.bfloat16, device, gen)[0], b, None),
        "non-contiguous weight": (x, w.t().contiguous().t(), b, None),
        "integer mask": (x, w, b, torch.ones(2, 9, dtype=torch.int64, device=device)),
        "empty": (x[:, :0], w, b, None),
    }
    for name, (xi, wi, bi, mi) in cases.items():
        assert btd.why_not(xi, wi, bi, mi, silu) is not None, name
        out = torch.empty(xi.shape, dtype=xi.dtype, device=device)
        assert not btd.conv_fwd_btd(xi, wi, bi, mi, silu, True, out, allow_cpu=True), name
    assert btd.why_not(x, w, b, None, _activation.code("silu")) is None


@pytest.mark.parametrize("measured", [True, False], ids=["measured", "unmeasured"])
def test_backend_asks_the_kernel_only_where_measured(btd, triton_backend, device, monkeypatch, measured):
    """The Triton backend's fused forward and channel-last forward ask this kernel for the `(has mask, W)`
    pairs of `MEASURED_FASTER` only; the result matches the oracle either way."""
    import causal_conv1d_mps as ccmps

    calls = []
    real = btd.conv_fwd_btd

    def spy(*args, **kwargs):
        calls.append(args[3] is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(btd, "conv_fwd_btd", spy)
    monkeypatch.setattr(btd, "MEASURED_FASTER", frozenset({(True, 4), (False, 4)}) if measured else frozenset())
    gen = seeded(53)
    x = randn(2, 24, 16, dtype=torch.bfloat16, device=device, generator=gen)
    w, b = make_params(16, 4, torch.bfloat16, device, gen)
    am = torch.ones(2, 24, dtype=torch.int64, device=device)
    am[1, :7] = 0
    with torch.no_grad():
        fused = ccmps.short_conv_fused(x, w, b, am)
        conv = ccmps.causal_conv1d(x.transpose(1, 2), w, b, "silu")
    ref, _ = oracle.short_conv_fused(x, w, b, am, True, True)
    ref_conv, _ = oracle.short_conv_fused(x, w, b, None, True, False)
    assert_close_rel(fused, ref, torch.bfloat16, "fused")
    assert_close_rel(conv.transpose(1, 2), ref_conv, torch.bfloat16, "channel-last conv")
    assert conv.transpose(1, 2).is_contiguous(), "channel-last output keeps x's layout"
    assert calls == ([True, False] if measured else []), calls


def test_plans_follow_the_signature(btd, device, monkeypatch):
    """A launch plan is kept per call signature: calls that differ from a planned one in one field (strides,
    residual, mask, bias, weight dtype, activation, out's strides) each get their own result, an address that
    breaks the alignment is refused on a planned signature, and the table stays bounded."""
    monkeypatch.setattr(btd, "_plans", {})
    gen = seeded(54)
    base = randn(2, 26, 16, dtype=torch.bfloat16, device=device, generator=gen)
    w, b = make_params(16, 3, torch.bfloat16, device, gen)
    mask = _mask(2, 26, device, "fractional", gen)
    variants = [
        ("plain", base, w, b, None, "silu", True),
        ("T stride", base[:, ::2], w, b, None, "silu", True),
        ("no residual", base, w, b, None, "silu", False),
        ("mask", base, w, b, mask, "silu", True),
        ("no bias", base, w, None, None, "silu", True),
        ("float32 weight", base, w.float(), b.float(), None, "silu", True),
        ("identity", base, w, b, None, None, True),
        ("plain again", base, w, b, None, "silu", True),
    ]
    for name, x, wi, bi, mi, act, res in variants:
        _check(btd, x, wi, bi, mi, act, res, name)
    strided_out = torch.empty(2, 26, 20, dtype=torch.bfloat16, device=device)[:, :, 4:]
    assert btd.conv_fwd_btd(base, w, b, None, 1, True, strided_out, allow_cpu=True)
    ref, _ = oracle.short_conv_fused(base, w, b, None, True, True)
    assert_close_rel(strided_out, ref, torch.bfloat16, "out strides")
    misaligned = torch.empty(2 * 26 * 16 + 1, dtype=torch.bfloat16, device=device)[1:].view(2, 26, 16)
    misaligned.copy_(base)
    assert btd.conv_fwd_btd(misaligned, w, b, None, 1, True, torch.empty_like(base), allow_cpu=True) is False
    assert len(btd._plans) == 8  # seven distinct signatures above, and the strided out
    monkeypatch.setattr(btd, "_MAX_PLANS", 4)
    for t in range(5, 12):
        _check(btd, base[:, :t], w, b, None, "silu", True, f"T {t}")
    assert len(btd._plans) <= 4


def test_the_launcher_hands_the_driver_what_it_hands_the_harness(btd, device, monkeypatch):
    """On a GPU the launcher passes pointers to a prepared driver launch; here (the harness takes tensors) the
    driver is stood in: the launch must carry the grid, block and integers of the harness launch that the
    oracle tests verify, and the pointers of the right tensors in the right slots."""
    from causal_conv1d_mps import _activation

    if device.type != "cpu":
        pytest.skip("the stand-in driver takes CPU tensors")
    gen = seeded(55)
    wide = randn(3, 40, 24, dtype=torch.float16, device=device, generator=gen)
    x = wide[:, ::2, 4:]  # strides over B and T that differ from out's
    weight, bias = make_params(20, 6, torch.float32, device, gen)
    mask = _mask(3, 20, device, "binary", gen)
    silu = _activation.SILU

    monkeypatch.setattr(btd, "_plans", {})
    assert btd.conv_fwd_btd(x, weight, bias, mask, silu, True, torch.empty_like(x), allow_cpu=True)
    (harness,) = btd._plans.values()
    expected = (harness._grid, harness._block, harness._ints)

    driver = RecordingDriver(pointers=5, ints=6)
    monkeypatch.setattr(btd, "_plans", {})
    stand_in_cuda_driver(monkeypatch, driver, stream=0x88)
    out = torch.empty_like(x)
    assert btd.conv_fwd_btd(x, weight, bias, mask, silu, True, out, allow_cpu=True)
    (launch,) = driver.launches
    assert (launch["grid"], launch["block"], launch["args"][5:], launch["stream"]) == (*expected, 0x88)
    assert launch["args"][:5] == [t.data_ptr() for t in (x, weight, bias, mask, out)]
