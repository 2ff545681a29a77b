"""The channel-last CUDA C++ forward and backward (`causal_conv1d_mps/cuda/kernels/conv_btd.cu`) against the
float64 oracle.

On `--device cpu` the shipped source runs through `cuda_harness` (compiled as C++, run on the CPU); on
`--device cuda` through NVRTC. Covered: every width 1..16, both 16-bit dtypes, float32 and 16-bit weights,
bias or none, identity and SiLU, masks (0/1, fractional, NaN inputs at masked positions), the residual,
T < W, T not a multiple of the run, D not a multiple of a block's channels, B = 1, strided views, where the
kernel does not apply, and the dispatch of the Triton backend (measured pairs only). The backward: the same
cases for dx, dweight and dbias, several chunks of T, masked NaN inputs, the NaN pattern of the weight
gradient, strided x / dout / dx, determinism, and its dispatch.
"""

from __future__ import annotations

import pytest
import torch

import oracle
from conftest import (RecordingDriver, assert_close_rel, make_params, randn, record_defines, seeded,
                      stand_in_cuda_driver)


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


def case_channels(width: int) -> int:
    """D of a case's shapes: one per case, so that each case compiles one variant (D is compiled in), and
    across cases both a D within one block's channels (12) and one past it (264)."""
    return 264 if width % 2 else 12


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
    D = case_channels(width)
    for B, T in ((2, 21), (1, 3)):  # T not a multiple of the run, T < W
        x = randn(B, T, D, dtype=dtype, device=device, generator=gen)
        weight, bias = make_params(D, width, wdtype, device, gen, with_bias=with_bias)
        mask = _mask(B, T, device, mask_kind, gen)
        _check(btd, x, weight, bias, mask, activation, residual, f"W{width} B{B} T{T} D{D}")


def _masked_nan_inputs(device, gen):
    """x `[2, 19, 8]` bf16 with a NaN and an Inf inside the masked stretch (mask[0, :5] = 0), W = 4 float32
    weights and bias, and the float32 mask."""
    x = randn(2, 19, 8, dtype=torch.bfloat16, device=device, generator=gen)
    weight, bias = make_params(8, 4, torch.float32, device, gen)
    mask = torch.ones(2, 19, device=device)
    mask[0, :5] = 0
    x[0, 2, 3] = float("nan")
    x[0, 4, 0] = float("inf")
    return x, weight, bias, mask


def test_masked_nan_reaches_only_its_own_residual(btd, device):
    """A NaN input where the mask is 0 contributes nothing to the conv; the residual adds it back at its own
    position only (docs/CONTRACT.md, the NaN containment rules)."""
    gen = seeded(50)
    x, weight, bias, mask = _masked_nan_inputs(device, gen)
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
    canvas, out = _strided_canvas(torch.bfloat16, device)
    assert btd.conv_fwd_btd(x, weight, bias, mask, 1, True, out, allow_cpu=True)
    assert_close_rel(out, ref, torch.bfloat16, "strided")
    _assert_written_inside(canvas, "out")


def _strided_canvas(dtype, device):
    """A NaN-filled `[2, 30, 16]` tensor and its `[2, 27, 12]` view at offset (1, 4): an output with B and T
    strides of its own."""
    canvas = torch.full((2, 30, 16), float("nan"), dtype=dtype, device=device)
    return canvas, canvas[:, 1:28, 4:16]


def _assert_written_inside(canvas, name):
    """Nothing outside `_strided_canvas`'s view was written (it is still NaN)."""
    untouched = canvas.clone()
    untouched[:, 1:28, 4:16] = 0
    assert torch.isnan(untouched[:, 0]).all() and torch.isnan(untouched[:, 28:]).all()
    assert torch.isnan(untouched[:, :, :4]).all(), f"wrote outside {name}"


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
        "uint8 mask": (x, w, b, torch.ones(2, 9, dtype=torch.uint8, device=device)),
        "float16 mask": (x, w, b, torch.ones(2, 9, dtype=torch.float16, device=device)),
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


# ------------------------------------------------------------------ backward


def _check_backward(btd, x, weight, bias, mask, activation, residual, name, dout=None, dx=None, gen=None):
    """Run the backward launcher and compare dx, dweight, dbias with autograd through the float64 oracle."""
    from causal_conv1d_mps import _activation

    if dout is None:
        dout = randn(*x.shape, dtype=x.dtype, device=x.device, generator=gen)
    if dx is None:
        dx = torch.full_like(x, float("nan")).contiguous()
    grads = btd.conv_bwd_btd(x, weight, bias, mask, dout, _activation.code(activation), residual, dx,
                             allow_cpu=True)
    assert grads is not None, btd.why_not(x, weight, bias, mask, _activation.code(activation))
    dweight, dbias = grads
    x64 = x.detach().cpu().double().requires_grad_()
    w64 = weight.detach().cpu().double().requires_grad_()
    b64 = None if bias is None else bias.detach().cpu().double().requires_grad_()
    ref, _ = oracle.short_conv_fused(x64, w64, b64, None if mask is None else mask.cpu(),
                                     activation is not None, residual)
    ref.backward(dout.detach().cpu().double())
    assert dweight.dtype == weight.dtype and dweight.shape == weight.shape, (dweight.dtype, dweight.shape)
    assert_close_rel(dx, x64.grad, x.dtype, f"{name} dx")
    assert_close_rel(dweight, w64.grad, x.dtype, f"{name} dweight")
    if bias is None:
        assert dbias is None
    else:
        assert dbias.dtype == bias.dtype
        assert_close_rel(dbias, b64.grad, x.dtype, f"{name} dbias")
    return dx, dweight, dbias


@pytest.fixture
def bwd_compiled(btd, monkeypatch):
    """The defines of each backward variant the launcher compiles, in order (from an empty plan table)."""
    monkeypatch.setattr(btd, "_backward_plans", {})
    return record_defines(monkeypatch, "cc_conv_bwd_btd")


# (B, T) with D = case_channels(W): T = 21 one chunk, T not a multiple of the batch; T = 3 < W; T = 200 with
# B = 1: several chunks, the middle ones inside [0, T) (no bounds checks where switched on), the first and
# last not
BACKWARD_SHAPES = ((2, 21), (1, 3), (1, 200))


@pytest.mark.parametrize("width,dtype,wdtype,with_bias,activation,mask_kind,residual", CASES,
                         ids=[f"W{c[0]}-{str(c[1])[6:]}-w{str(c[2])[6:]}-{'b' if c[3] else 'nob'}-{c[4]}-{c[5]}"
                              for c in CASES])
def test_backward_matches_oracle(btd, device, bwd_compiled, width, dtype, wdtype, with_bias, activation,
                                 mask_kind, residual):
    """Contiguous x, dout and dx: the variant with D compiled in, as shipped (chunks without bounds checks
    where `_BWD_INSIDE`; the same-bits test below checks that path against this one)."""
    gen = seeded(60 + width)
    D = case_channels(width)
    for B, T in BACKWARD_SHAPES:
        x = randn(B, T, D, dtype=dtype, device=device, generator=gen)
        weight, bias = make_params(D, width, wdtype, device, gen, with_bias=with_bias)
        mask = _mask(B, T, device, mask_kind, gen)
        _check_backward(btd, x, weight, bias, mask, activation, residual, f"W{width} B{B} T{T} D{D}", gen=gen)
        defines = bwd_compiled[-1]
        assert (defines["CC_BWD_D"], defines["CC_BWD_INSIDE"]) == (D, int(btd._BWD_INSIDE)), defines
    assert len(bwd_compiled) == len(BACKWARD_SHAPES), "one plan per shape"
    assert len({tuple(sorted(d.items())) for d in bwd_compiled}) == 1, "one compiled variant per case"


def _interior_chunks(btd, B, T, D, W, has_mask, residual):
    """(chunks, how many of them stream only rows inside [0, T)): the kernel's condition for its path without
    bounds checks (its W-1 rows before, and its batches whole, the last one included)."""
    vec, run = btd.backward_variant(has_mask, residual, W)
    chunk, chunks = btd._chunking(T, -(-(D // vec) // btd.THREADS) * B, run)
    span = -(-(chunk + W - 1) // run) * run
    return chunks, sum(i * chunk >= W - 1 and i * chunk + span <= T for i in range(chunks))


def test_backward_cases_cover_every_variant_and_several_chunks(btd):
    """The cases above reach every (channels per thread, rows per batch) variant the launcher picks; the
    T = 200, B = 1 shape spans several chunks (their ends are where rows are read twice), some of them inside
    [0, T) and some not, at every case; the other shapes have one chunk, never inside."""
    picked = {btd.backward_variant(mask is not None, residual, W) for W, *_, mask, residual in CASES}
    assert picked == {btd.backward_variant(m, r, W) for m in (False, True) for r in (False, True)
                      for W in range(1, btd.MAX_WIDTH + 1)}
    for vec, run in picked:
        for D in (case_channels(1), case_channels(2)):
            chunk, chunks = btd._chunking(200, -(-(D // vec) // btd.THREADS), run)
            assert chunks > 1 and chunk % run == 0 and (chunks - 1) * chunk < 200 <= chunks * chunk
    for W, *_, mask, residual in CASES:
        for B, T in BACKWARD_SHAPES:
            chunks, inside = _interior_chunks(btd, B, T, case_channels(W), W, mask is not None, residual)
            if T == 200:
                assert 0 < inside < chunks, (W, chunks, inside)
            else:
                assert (chunks, inside) == (1, 0), (W, T, chunks, inside)


def _reaching_t(btd, W, has_mask, residual):
    """The first T whose chunks (B = 1, D = 8) include one inside [0, T) that ends less than a batch before T:
    its last batch reaches T only in its rows past t1 + W - 2, which the kernel streams whole (it does not
    check them), so that chunk must be left to the checked path."""
    vec, run = btd.backward_variant(has_mask, residual, W)
    for T in range(64, 2048):
        chunk, chunks = btd._chunking(T, -(-(8 // vec) // btd.THREADS), run)
        span = -(-(chunk + W - 1) // run) * run
        if any(W - 1 <= i * chunk and i * chunk + chunk + W - 1 <= T < i * chunk + span for i in range(chunks)):
            return T
    raise AssertionError(f"no such T at W = {W}")


@pytest.mark.parametrize("width,mask_kind,residual", [(4, "binary", True), (3, None, False), (7, "binary", True)],
                         ids=["W4-mask-res", "W3-plain", "W7-mask-res"])
def test_backward_chunk_whose_last_batch_passes_t(btd, device, bwd_compiled, monkeypatch, width, mask_kind,
                                                  residual):
    """A chunk that lies inside [0, T) with its W-1 rows after, but whose last whole batch does not: it keeps
    the bounds checks (read past T, the guard of the harness reports it, or the gradients go wrong)."""
    monkeypatch.setattr(btd, "_BWD_INSIDE", True)
    T = _reaching_t(btd, width, mask_kind is not None, residual)
    gen = seeded(71 + width)
    x = randn(1, T, 8, dtype=torch.bfloat16, device=device, generator=gen)
    weight, bias = make_params(8, width, torch.bfloat16, device, gen)
    mask = _mask(1, T, device, mask_kind, gen)
    _check_backward(btd, x, weight, bias, mask, "silu", residual, f"W{width} T{T}", gen=gen)
    assert bwd_compiled[-1]["CC_BWD_INSIDE"] == 1


@pytest.mark.parametrize("width,dtype,mask_kind,residual", [
    (1, torch.bfloat16, "binary", True), (3, torch.bfloat16, "binary", True), (4, torch.float16, None, False),
    (7, torch.bfloat16, "fractional", True), (16, torch.float16, None, True)], ids=lambda v: str(v))
def test_backward_variants_give_the_same_bits(btd, device, bwd_compiled, monkeypatch, width, dtype, mask_kind,
                                              residual):
    """D compiled in or not, chunks inside [0, T) without bounds checks or not: the same arithmetic in the same
    order, so the same dx, dweight and dbias bits (the A/B switches of launch_btd change speed only)."""
    gen = seeded(69 + width)
    B, T, D = 2, 200, 8
    x = randn(B, T, D, dtype=dtype, device=device, generator=gen)
    weight, bias = make_params(D, width, torch.float32, device, gen)
    mask = _mask(B, T, device, mask_kind, gen)
    dout = randn(B, T, D, dtype=dtype, device=device, generator=gen)
    assert _interior_chunks(btd, B, T, D, width, mask is not None, residual)[1] > 0
    results = []
    for compiled_d, inside in ((False, False), (True, False), (False, True), (True, True)):
        monkeypatch.setattr(btd, "_BWD_COMPILED_D", compiled_d)
        monkeypatch.setattr(btd, "_BWD_INSIDE", inside)
        btd._backward_plans.clear()
        dx = torch.full_like(x, float("nan"))
        results.append((dx, *btd.conv_bwd_btd(x, weight, bias, mask, dout, 1, residual, dx, allow_cpu=True)))
        assert (bwd_compiled[-1]["CC_BWD_D"], bwd_compiled[-1]["CC_BWD_INSIDE"]) == (D * compiled_d, int(inside))
    for got in results[1:]:
        for a, b, name in zip(results[0], got, ("dx", "dweight", "dbias")):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), name
    _check_backward(btd, x, weight, bias, mask, "silu", residual, f"W{width}", dout=dout)


def test_backward_masked_nan_contributes_nothing(btd, device):
    """A NaN or Inf input where the mask is 0 reaches no gradient: dx there is the residual's dout only (or 0),
    and dweight / dbias stay finite (docs/CONTRACT.md, the NaN containment rules)."""
    gen = seeded(61)
    x, weight, bias, mask = _masked_nan_inputs(device, gen)
    for residual in (False, True):
        dout = randn(*x.shape, dtype=torch.bfloat16, device=device, generator=gen)
        dx = torch.empty_like(x)
        dweight, dbias = btd.conv_bwd_btd(x, weight, bias, mask, dout, 1, residual, dx, allow_cpu=True)
        assert torch.isfinite(dx).all() and torch.isfinite(dweight).all() and torch.isfinite(dbias).all()
        masked = dx[0, :5].float()
        want = dout[0, :5].float() if residual else torch.zeros_like(masked)
        assert torch.equal(masked.cpu(), want.cpu()), "dx at masked positions: the residual's dout only"


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_backward_nan_pattern_follows_the_oracle(btd, device, masked):
    """NaN gradients spread as in the reference: one at t = 0 reaches the weight taps that read the zeros
    before the start (0 * NaN is NaN: the kernel must not skip those products); one just after a masked
    stretch reaches the masked positions' dx in none of its channels (the mask selects, it does not
    multiply)."""
    gen = seeded(62)
    B, T, D, W = 1, 12, 4, 3
    x = randn(B, T, D, dtype=torch.bfloat16, device=device, generator=gen)
    weight, bias = make_params(D, W, torch.bfloat16, device, gen)
    dout = randn(B, T, D, dtype=torch.bfloat16, device=device, generator=gen)
    dout[0, 0, 1] = float("nan")
    mask = None
    if masked:
        mask = torch.ones(B, T, device=device)
        mask[0, 3:6] = 0
        dout[0, 6, 2] = float("nan")
    for residual in (False, True):
        dx = torch.empty_like(x)
        dweight, dbias = btd.conv_bwd_btd(x, weight, bias, mask, dout, 1, residual, dx, allow_cpu=True)
        x64, w64, b64 = (t.detach().cpu().double().requires_grad_() for t in (x, weight, bias))
        ref, _ = oracle.short_conv_fused(x64, w64, b64, None if mask is None else mask.cpu(), True, residual)
        ref.backward(dout.cpu().double())
        for got, want, name in ((dx, x64.grad, "dx"), (dweight, w64.grad, "dweight"), (dbias, b64.grad, "dbias")):
            assert torch.equal(torch.isnan(got).cpu(), torch.isnan(want)), f"{name}, residual {residual}"
        if masked:
            assert not torch.isnan(dx[0, 3:6, 2]).any(), "a NaN reached a masked position's dx"


def test_backward_strided_views(btd, device, bwd_compiled):
    """x, dout and dx read and written in place whatever their B/T strides (multiples of 4 elements)."""
    gen = seeded(63)
    x = randn(3, 40, 24, dtype=torch.float16, device=device, generator=gen)[::2, 3:30, 8:20]
    dout = randn(2, 60, 16, dtype=torch.float16, device=device, generator=gen)[:, ::2][:, :27, 4:]
    weight, bias = make_params(12, 5, torch.float16, device, gen)
    mask = _mask(2, 27, device, "fractional", gen)
    canvas, dx = _strided_canvas(torch.float16, device)
    _check_backward(btd, x, weight, bias, mask, "silu", True, "strided", dout=dout, dx=dx)
    _assert_written_inside(canvas, "dx")
    assert [d["CC_BWD_D"] for d in bwd_compiled] == [0], "views: the strides are arguments"


def test_backward_one_view_takes_the_runtime_strides(btd, device, bwd_compiled):
    """D is compiled in only where x, dout and dx are all contiguous: one view among them (x, dout or dx, over
    several chunks) sends the call to the variant with runtime strides, and its gradients are right."""
    gen = seeded(70)
    B, T, D = 2, 200, 8
    x = randn(B, T, D, dtype=torch.bfloat16, device=device, generator=gen)
    weight, bias = make_params(D, 4, torch.bfloat16, device, gen)
    mask = _mask(B, T, device, "binary", gen)
    dout = randn(B, T, D, dtype=torch.bfloat16, device=device, generator=gen)
    wide = randn(B, T, 2 * D, dtype=torch.bfloat16, device=device, generator=gen)

    def view(t):
        canvas = wide.clone()
        canvas[:, :, D:] = t
        return canvas[:, :, D:]

    for name, xi, gi, dxi in (("x", view(x), dout, None), ("dout", x, view(dout), None),
                              ("dx", x, dout, torch.full_like(wide, float("nan"))[:, :, :D])):
        _check_backward(btd, xi, weight, bias, mask, "silu", True, f"{name} a view", dout=gi, dx=dxi)
        assert bwd_compiled[-1]["CC_BWD_D"] == 0, name
    _check_backward(btd, x, weight, bias, mask, "silu", True, "contiguous", dout=dout)
    assert bwd_compiled[-1]["CC_BWD_D"] == D


def test_backward_is_deterministic(btd, device):
    """The weight gradient is summed in a fixed order: two calls give the same bits."""
    gen = seeded(64)
    x = randn(2, 300, 16, dtype=torch.bfloat16, device=device, generator=gen)
    weight, bias = make_params(16, 4, torch.float32, device, gen)
    dout = randn(2, 300, 16, dtype=torch.bfloat16, device=device, generator=gen)
    first = btd.conv_bwd_btd(x, weight, bias, None, dout, 1, True, torch.empty_like(x), allow_cpu=True)
    second = btd.conv_bwd_btd(x, weight, bias, None, dout, 1, True, torch.empty_like(x), allow_cpu=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_backward_where_it_does_not_apply(btd, device):
    """None, and dx untouched, where the kernels cannot take the call: what the forward refuses, and a dout
    or dx of another dtype, shape or layout."""
    gen = seeded(65)
    x = randn(2, 9, 8, dtype=torch.bfloat16, device=device, generator=gen)
    w, b = make_params(8, 4, torch.bfloat16, device, gen)
    dout = randn(2, 9, 8, dtype=torch.bfloat16, device=device, generator=gen)
    cases = {
        "float32 x": (x.float(), w.float(), b.float(), dout.float()),
        "D not a multiple of 4": (x[:, :, :6], w[:6], b[:6], dout[:, :, :6]),
        "W = 17": (x, make_params(8, 17, torch.bfloat16, device, gen)[0], b, dout),
        "float16 dout": (x, w, b, dout.half()),
        "dout of another shape": (x, w, b, dout[:, :8]),
        "dout T-contiguous": (x, w, b, dout.transpose(1, 2).contiguous().transpose(1, 2)),
        "misaligned dout": (x[:, :, :4], w[:4], b[:4], dout[:, :, 1:5]),
        "empty": (x[:, :0], w, b, dout[:, :0]),
    }
    for name, (xi, wi, bi, gi) in cases.items():
        dx = torch.full(xi.shape, 7.0, dtype=xi.dtype, device=device)
        assert btd.conv_bwd_btd(xi, wi, bi, None, gi, 1, True, dx, allow_cpu=True) is None, name
        assert (dx == 7).all(), f"{name}: dx written"
    dx = torch.full_like(x, 7.0).transpose(1, 2).contiguous().transpose(1, 2)  # T-contiguous dx
    assert btd.conv_bwd_btd(x, w, b, None, dout, 1, True, dx, allow_cpu=True) is None


@pytest.mark.parametrize("measured", [True, False], ids=["measured", "unmeasured"])
def test_backend_backward_asks_the_kernel_only_where_measured(btd, triton_backend, device, monkeypatch, measured):
    """The Triton backend's fused backward and channel-last backward ask this kernel for the pairs of
    `BACKWARD_MEASURED_FASTER` only, and never with initial states or packed sequences; the gradients match
    the oracle either way."""
    import causal_conv1d_mps as ccmps

    calls = []
    real = btd.conv_bwd_btd

    def spy(*args, **kwargs):  # CPU tensors are let through to the harness, so the kernel serves the call
        result = real(*args, **kwargs, allow_cpu=True)
        calls.append((args[3] is not None, result is not None))
        return result

    monkeypatch.setattr(btd, "conv_bwd_btd", spy)
    monkeypatch.setattr(btd, "BACKWARD_MEASURED_FASTER",
                        frozenset({(True, 4), (False, 4)}) if measured else frozenset())
    gen = seeded(66)
    x = randn(2, 24, 16, dtype=torch.bfloat16, device=device, generator=gen)
    w, b = make_params(16, 4, torch.bfloat16, device, gen)
    am = torch.ones(2, 24, dtype=torch.int64, device=device)
    am[1, :7] = 0
    dout = randn(2, 24, 16, dtype=torch.bfloat16, device=device, generator=gen)
    xl, wl, bl = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ccmps.short_conv_fused(xl, wl, bl, am).backward(dout)
    xc, wc, bc = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ccmps.causal_conv1d(xc.transpose(1, 2), wc, bc, "silu").backward(dout.transpose(1, 2))
    h0 = randn(2, 16, 3, dtype=torch.bfloat16, device=device, generator=gen)
    ccmps.short_conv_fused(x.detach().requires_grad_(), w, b, am, initial_states=h0).sum().backward()
    assert calls == ([(True, True), (False, True)] if measured else []), calls
    for mask, residual, (xg, wg, bg), name in ((am, True, (xl, wl, bl), "fused"),
                                                (None, False, (xc, wc, bc), "channel-last conv")):
        x64, w64, b64 = (t.detach().cpu().double().requires_grad_() for t in (x, w, b))
        ref, _ = oracle.short_conv_fused(x64, w64, b64, None if mask is None else mask.cpu(), True, residual)
        ref.backward(dout.cpu().double())
        assert_close_rel(xg.grad, x64.grad, torch.bfloat16, f"{name} dx")
        assert_close_rel(wg.grad, w64.grad, torch.bfloat16, f"{name} dweight")
        assert_close_rel(bg.grad, b64.grad, torch.bfloat16, f"{name} dbias")


def test_backward_plans_follow_the_signature(btd, device, monkeypatch):
    """One backward plan per signature: calls that differ in one field (x's strides, dout's, residual, mask,
    bias, weight dtype, activation) each get their own plan and a correct result; the table stays bounded."""
    monkeypatch.setattr(btd, "_backward_plans", {})
    gen = seeded(67)
    base = randn(2, 26, 16, dtype=torch.bfloat16, device=device, generator=gen)
    w, b = make_params(16, 3, torch.bfloat16, device, gen)
    mask = _mask(2, 26, device, "fractional", gen)
    dout = randn(2, 26, 16, dtype=torch.bfloat16, device=device, generator=gen)
    variants = [
        ("plain", base, w, b, None, "silu", True, dout),
        ("T stride", base[:, ::2], w, b, None, "silu", True, dout[:, :13]),
        ("dout T stride", base[:, :13], w, b, None, "silu", True, dout[:, ::2]),
        ("no residual", base, w, b, None, "silu", False, dout),
        ("mask", base, w, b, mask, "silu", True, dout),
        ("no bias", base, w, None, None, "silu", True, dout),
        ("float32 weight", base, w.float(), b.float(), None, "silu", True, dout),
        ("identity", base, w, b, None, None, True, dout),
        ("plain again", base, w, b, None, "silu", True, dout),
    ]
    for name, x, wi, bi, mi, act, res, gi in variants:
        _check_backward(btd, x, wi, bi, mi, act, res, name, dout=gi)
    assert len(btd._backward_plans) == 8
    monkeypatch.setattr(btd, "_MAX_PLANS", 4)
    for t in range(5, 12):
        _check_backward(btd, base[:, :t], w, b, None, "silu", True, f"T {t}", dout=dout[:, :t])
    assert len(btd._backward_plans) <= 4


def test_the_backward_launcher_hands_the_driver_what_it_hands_the_harness(btd, device, monkeypatch):
    """The backward's two driver launches (conv, then the fixed-order reduction) carry the grids, blocks and
    integers of the harness launches the oracle tests verify, and the right pointers in the right slots."""
    from causal_conv1d_mps import _activation

    if device.type != "cpu":
        pytest.skip("the stand-in driver takes CPU tensors")
    gen = seeded(68)
    x = randn(3, 40, 24, dtype=torch.float16, device=device, generator=gen)[:, ::2, 4:]
    dout = randn(3, 20, 20, dtype=torch.float16, device=device, generator=gen)
    weight, bias = make_params(20, 6, torch.float32, device, gen)
    mask = _mask(3, 20, device, "binary", gen)
    silu = _activation.SILU

    monkeypatch.setattr(btd, "_backward_plans", {})
    assert btd.conv_bwd_btd(x, weight, bias, mask, dout, silu, True, torch.empty_like(dout), allow_cpu=True)
    (plan,) = btd._backward_plans.values()
    conv, reduce = plan.conv.__self__, plan.reduce.__self__
    expected = [(conv._grid, conv._block, conv._ints), (reduce._grid, reduce._block, reduce._ints)]

    driver = RecordingDriver(pointers=7, ints=10, layouts={0x3000: (3, 2)})
    monkeypatch.setattr(btd, "_backward_plans", {})
    stand_in_cuda_driver(monkeypatch, driver, {"cc_conv_bwd_btd": 0x2000, "cc_reduce_partials": 0x3000}, 0x99)
    dx = torch.empty_like(dout)
    dweight, dbias = btd.conv_bwd_btd(x, weight, bias, mask, dout, silu, True, dx, allow_cpu=True)
    conv_launch, reduce_launch = driver.launches
    assert (conv_launch["func"], reduce_launch["func"]) == (0x2000, 0x3000)
    assert (conv_launch["grid"], conv_launch["block"], conv_launch["args"][7:]) == expected[0]
    assert conv_launch["args"][:5] == [t.data_ptr() for t in (x, weight, bias, mask, dout)]
    assert conv_launch["args"][5] == dx.data_ptr()
    partials = conv_launch["args"][6]
    assert (reduce_launch["grid"], reduce_launch["block"]) == expected[1][:2]
    # the reduction reads what the conv wrote, and writes the gradients returned
    assert reduce_launch["args"][:3] == [partials, dweight.data_ptr(), dbias.data_ptr()]
    assert reduce_launch["args"][3:5] == list(expected[1][2])
    assert {conv_launch["stream"], reduce_launch["stream"]} == {0x99}


def test_each_variant_compiles_one_kernel_and_checks_its_own_defines():
    """Each kernel's own defines are required for it and refused for the other (backward: CC_BWD_VEC,
    CC_BWD_RUN; forward: CC_FWD_VEC, CC_FWD_RUN, CC_FWD_INSIDE, CC_D); with the backward's the file's text holds
    the backward kernel only, with the forward's the forward only. CC_D takes 0 or a multiple of 4."""
    from causal_conv1d_mps import _activation
    from causal_conv1d_mps.cuda import _source

    shared = dict(CC_W=4, CC_X_BF16=1, CC_WT=0, CC_HAS_BIAS=1, CC_ACTIVATION=_activation.SILU, CC_HAS_MASK=1,
                  CC_MASK_T=0, CC_RESIDUAL=1)
    own = dict(CC_BWD_VEC=4, CC_BWD_RUN=8, CC_BWD_INSIDE=1, CC_BWD_D=4096)
    forward_own = dict(CC_FWD_VEC=2, CC_FWD_RUN=32, CC_FWD_INSIDE=1, CC_D=4096)
    backward = _source.source("cc_conv_bwd_btd", {**shared, **own})
    assert "#define CC_BWD_VEC 4\n" in backward and "#define CC_BWD_RUN 8\n" in backward
    with pytest.raises(ValueError, match="cc_conv_bwd_btd"):
        _source.source("cc_conv_bwd_btd", shared)
    with pytest.raises(ValueError, match="CC_BWD_VEC"):
        _source.source("cc_conv_bwd_btd", {**shared, **own, "CC_BWD_VEC": 8})
    with pytest.raises(ValueError, match="expected"):
        _source.source("cc_conv_bwd_btd", {**shared, **own, **forward_own})
    with pytest.raises(ValueError, match="expected"):
        _source.source("cc_conv_fwd_btd", {**shared, **own, **forward_own})
    with pytest.raises(ValueError, match="cc_conv_fwd_btd"):
        _source.source("cc_conv_fwd_btd", shared)
    for name, value in (("CC_D", 6), ("CC_D", -4), ("CC_D", 1 << 24), ("CC_FWD_VEC", 8), ("CC_FWD_RUN", 64)):
        with pytest.raises(ValueError, match=name):
            _source.header({**shared, **forward_own, name: value}, "conv_btd.cu", "cc_conv_fwd_btd")
    forward = _source.source("cc_conv_fwd_btd", {**shared, **forward_own})
    assert "#ifndef CC_BWD_VEC" in forward and "#define CC_BWD_VEC" not in forward
    assert "#define CC_D 4096\n" in forward and "#define CC_FWD_INSIDE 1\n" in forward
