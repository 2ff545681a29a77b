"""Attention masks in their own dtype (float32, int64, int32, bool) on the CUDA path of `short_conv_fused`.

The api keeps those dtypes for 16-bit x on a CUDA device (`_validate.mask_dtype`), the channel-last CUDA C++
kernels read them as they come (`CC_MASK_T`), and the CUDA backend converts them to float32 only where its
Triton kernels serve (docs/BACKENDS.md). Each native dtype must give exactly what its float32 values give:
forward, dx, dweight and dbias.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import oracle
from conftest import assert_close_rel, make_params, randn, seeded

NATIVE = (torch.int64, torch.int32, torch.bool)


def _native_mask(B, T, dtype, device):
    """A `[B, T]` mask of `dtype`: a zero stretch in row 0, and for integers values 2 and -3 elsewhere (a
    non-zero mask value multiplies x as its float32 value does)."""
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[0, : T // 3] = 0
    mask[B - 1, T - 2] = 0
    if dtype != torch.bool:
        mask[B - 1, 1] = 2
        mask[0, T - 1] = -3
    return mask.to(dtype).to(device)


def _same(a, b, name):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", NATIVE, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("width", [4, 7])  # the backward's two (channels, rows) schemes
def test_kernels_read_each_mask_dtype_as_its_float32_values(btd, device, dtype, width):
    """Bit for bit what the float32 mask gives (whose gradients tests/test_cuda_btd.py checks against the
    oracle), and the forward against the oracle."""
    from causal_conv1d_mps import _activation

    gen = seeded(70 + width)
    B, T, D = 2, 45, 12
    x = randn(B, T, D, dtype=torch.bfloat16, device=device, generator=gen)
    weight, bias = make_params(D, width, torch.float32, device, gen)
    dout = randn(B, T, D, dtype=torch.bfloat16, device=device, generator=gen)
    native = _native_mask(B, T, dtype, device)
    as_float = native.to(torch.float32)
    silu = _activation.SILU
    results = {}
    for name, mask in (("native", native), ("float32", as_float)):
        out = torch.full_like(x, float("nan"))
        dx = torch.full_like(x, float("nan"))
        assert btd.conv_fwd_btd(x, weight, bias, mask, silu, True, out, allow_cpu=True), \
            btd.why_not(x, weight, bias, mask, silu)
        grads = btd.conv_bwd_btd(x, weight, bias, mask, dout, silu, True, dx, allow_cpu=True)
        assert grads is not None
        results[name] = (out, dx, *grads)
    for label, a, b in zip(("out", "dx", "dweight", "dbias"), results["native"], results["float32"]):
        _same(a, b, f"{dtype} W{width} {label}")
    ref, _ = oracle.short_conv_fused(x, weight, bias, as_float, True, True)
    assert_close_rel(results["native"][0], ref, torch.bfloat16, f"{dtype} W{width} against the oracle")


def test_which_dtype_the_api_keeps():
    """The mask keeps its own dtype only for 16-bit x on a CUDA device, only where the api asks (`native`),
    and only for the dtypes the kernels read; float64 x gets float64, everything else float32."""
    from causal_conv1d_mps import _validate

    def x_like(dtype, cuda):
        return SimpleNamespace(dtype=dtype, is_cuda=cuda)

    mask = {dt: SimpleNamespace(dtype=dt) for dt in (*NATIVE, torch.float32, torch.float16, torch.uint8)}
    for dt in (*NATIVE, torch.float32):
        assert _validate.mask_dtype(x_like(torch.bfloat16, True), mask[dt], True) == dt
        assert _validate.mask_dtype(x_like(torch.float16, True), mask[dt], True) == dt
        assert _validate.mask_dtype(x_like(torch.bfloat16, True), mask[dt], False) == torch.float32
        assert _validate.mask_dtype(x_like(torch.bfloat16, False), mask[dt], True) == torch.float32
        assert _validate.mask_dtype(x_like(torch.float32, True), mask[dt], True) == torch.float32
        assert _validate.mask_dtype(x_like(torch.float64, True), mask[dt], True) == torch.float64
    for dt in (torch.float16, torch.uint8):
        assert _validate.mask_dtype(x_like(torch.bfloat16, True), mask[dt], True) == torch.float32


def test_the_triton_kernels_get_float32_masks(triton_backend, device, monkeypatch):
    """Where the CUDA C++ kernels do not serve a call (here: turned off, as on a GPU where they failed to
    compile), the backend converts a native mask to float32 before its Triton kernels (their contract),
    forward, final states and backward; the results equal those of the float32 mask."""
    from causal_conv1d_mps import _activation
    from causal_conv1d_mps.triton import backend

    monkeypatch.setenv("CAUSAL_CONV1D_CUDA_KERNELS", "0")

    seen = []
    for name in ("launch_forward", "launch_backward", "gather_states"):
        real = getattr(backend, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.extend((_name, a.dtype) for a in args if isinstance(a, torch.Tensor) and a.dim() == 2
                        and a.shape == (2, 20))
            return _real(*args, **kwargs)

        monkeypatch.setattr(backend, name, spy)
    gen = seeded(75)
    x = randn(2, 20, 8, dtype=torch.float16, device=device, generator=gen)
    weight, bias = make_params(8, 4, torch.float16, device, gen)
    dout = randn(2, 20, 8, dtype=torch.float16, device=device, generator=gen)
    native = _native_mask(2, 20, torch.int64, device)
    silu = _activation.SILU
    outs = []
    for mask in (native, native.to(torch.float32)):
        out, final = backend.short_conv_fused_fwd(x, weight, bias, mask, None, None, silu, True, True)
        grads = backend.short_conv_fused_bwd(x, weight, bias, mask, None, None, dout, None, silu, True)
        outs.append((out, final, *grads[:3]))
    for label, a, b in zip(("out", "final states", "dx", "dweight", "dbias"), *outs):
        _same(a, b, label)
    assert {name for name, _ in seen} == {"launch_forward", "gather_states", "launch_backward"}, seen
    assert all(dt == torch.float32 for _, dt in seen), seen


def test_the_api_hands_an_int64_mask_to_the_kernel_unconverted(device, monkeypatch):
    """On a GPU, `short_conv_fused` with an HF int64 mask reaches the channel-last kernel with that very
    tensor's dtype: no conversion kernel per call."""
    if device.type != "cuda":
        pytest.skip("the api keeps native mask dtypes on CUDA devices only")
    import causal_conv1d_mps as ccmps
    from causal_conv1d_mps.cuda import launch_btd

    seen = []
    real = launch_btd.conv_fwd_btd

    def spy(x, weight, bias, mask, *args, **kwargs):
        seen.append(None if mask is None else mask.dtype)
        return real(x, weight, bias, mask, *args, **kwargs)

    monkeypatch.setattr(launch_btd, "conv_fwd_btd", spy)
    gen = seeded(76)
    x = randn(2, 64, 16, dtype=torch.bfloat16, device=device, generator=gen)
    weight, bias = make_params(16, 4, torch.bfloat16, device, gen)
    mask = _native_mask(2, 64, torch.int64, device)
    out = ccmps.short_conv_fused(x, weight, bias, mask)
    ref, _ = oracle.short_conv_fused(x, weight, bias, mask.to(torch.float32), True, True)
    assert_close_rel(out, ref, torch.bfloat16, "api with an int64 mask")
    assert seen == [torch.int64], seen


@pytest.mark.parametrize("dtype", NATIVE, ids=lambda d: str(d)[6:])
def test_the_reference_path_reads_a_native_mask_as_its_float32_values(device, dtype):
    """`CAUSAL_CONV1D_BACKEND=reference` on a GPU (or the reference fallback there) is handed the mask in its
    own dtype too: forward, final states and gradients equal those of its float32 values."""
    from causal_conv1d_mps import _activation, reference

    gen = seeded(77)
    x = randn(2, 30, 8, dtype=torch.bfloat16, device=device, generator=gen)
    weight, bias = make_params(8, 4, torch.bfloat16, device, gen)
    dout = randn(2, 30, 8, dtype=torch.bfloat16, device=device, generator=gen)
    native = _native_mask(2, 30, dtype, device)
    results = []
    for mask in (native, native.to(torch.float32)):
        out, final = reference.short_conv_fused_fwd(x, weight, bias, mask, None, None, _activation.SILU, True, True)
        grads = reference.short_conv_fused_bwd(x, weight, bias, mask, None, None, dout, None, _activation.SILU, True)
        results.append((out, final, *grads[:3]))
    for label, a, b in zip(("out", "final states", "dx", "dweight", "dbias"), *results):
        _same(a, b, f"{dtype} {label}")
