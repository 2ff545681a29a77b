"""Gradients of absent inputs (docs/BACKENDS.md, docs/PERFORMANCE.md section 4.5).

A backend's backward returns None for `dbias` when there is no bias and for `dinitial_states` when there are
no initial states, whichever road it takes (its kernels, the CUDA C++ kernels, the reference path for wide
filters), and allocates no placeholder. The custom ops, whose schemas return tensors, put a new empty tensor
there on every call, eagerly and under torch.compile; the public functions' gradients are unchanged.
"""
from __future__ import annotations

import functools

import pytest
import torch

import causal_conv1d_mps as ccmps
from causal_conv1d_mps import _backend, reference
from causal_conv1d_mps._activation import SILU
from conftest import seeded, serve_through_cuda_launchers

B, D, T = 2, 3, 11


def _rand(*shape, gen, device, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(device, dtype)


def _conv_case(device, layout: str, width: int = 4, bias: bool = False, init: bool = False):
    """(backend function name, its arguments, the inputs whose gradients come back: bias, initial states)."""
    gen = seeded(51)
    x = _rand(B, D, T, gen=gen, device=device)
    if layout == "channel-last":
        x = _rand(B, T, D, gen=gen, device=device).transpose(1, 2)
    weight = _rand(D, width, gen=gen, device=device)
    b = _rand(D, gen=gen, device=device) if bias else None
    h0 = _rand(B, D, width - 1, gen=gen, device=device) if init else None
    seq_idx = None
    if layout == "seq_idx":
        seq_idx = torch.tensor([[0] * 4 + [1] * 7, [2] * 9 + [-1] * 2], dtype=torch.int32, device=device)
    dout = _rand(B, D, T, gen=gen, device=device)
    if layout == "channel-last":
        dout = dout.transpose(1, 2).contiguous().transpose(1, 2)
    return "causal_conv1d_bwd", (x, weight, b, seq_idx, h0, dout, None, SILU), (b, h0)


def _fused_case(device, packed: bool, bias: bool = False, init: bool = False):
    gen = seeded(52)
    x = _rand(1 if packed else B, T, D, gen=gen, device=device)
    weight = _rand(D, 4, gen=gen, device=device)
    b = _rand(D, gen=gen, device=device) if bias else None
    cu = mask = None
    rows = B
    if packed:
        cu, rows = torch.tensor([0, 4, 4, T], dtype=torch.int32, device=device), 3
    else:
        mask = (torch.arange(T, device=device) % 4 != 1).float().expand(B, T).contiguous()
    h0 = _rand(rows, D, 3, gen=gen, device=device) if init else None
    dout = _rand(*x.shape, gen=gen, device=device)
    return "short_conv_fused_bwd", (x, weight, b, mask, h0, cu, dout, None, SILU, True), (b, h0)


CASES = {
    "conv [B, D, T]": lambda device, **k: _conv_case(device, "contiguous", **k),
    "conv channel-last": lambda device, **k: _conv_case(device, "channel-last", **k),
    "conv seq_idx": lambda device, **k: _conv_case(device, "seq_idx", **k),
    "conv W = 25": lambda device, **k: _conv_case(device, "contiguous", width=25, **k),  # Triton: reference
    "fused with a mask": lambda device, **k: _fused_case(device, packed=False, **k),
    "fused cu_seqlens": lambda device, **k: _fused_case(device, packed=True, **k),
}


def _check_backward(fn, name: str, args: tuple, given: tuple, label: str) -> None:
    """`fn(*args)`'s dbias / dinitial_states: None where the input is absent, else the input's shape and dtype;
    dx and dweight as the reference path's."""
    grads = fn(*args)
    assert len(grads) == 4, f"{label}: {len(grads)} results"
    for got, inp, what in zip(grads[2:], given, ("dbias", "dinitial_states")):
        if inp is None:
            assert got is None, f"{label}: {what} of an absent input came back as {type(got).__name__}"
        else:
            assert isinstance(got, torch.Tensor) and got.shape == inp.shape and got.dtype == inp.dtype, (
                f"{label}: {what} {getattr(got, 'shape', got)}")
    want = getattr(reference, name)(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                      for a in args])
    for got, ref, what in ((grads[0], want[0], "dx"), (grads[1], want[1], "dweight")):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{label} {what}: {m}")


@pytest.mark.parametrize("given", ["neither", "bias", "initial states", "both"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_backend_returns_none_for_gradients_of_absent_inputs(backend, device, case, given):
    name, args, inputs = CASES[case](device, bias=given in ("bias", "both"), init=given in ("initial states", "both"))
    module = _backend.select(device, args[0].dtype)
    _check_backward(getattr(module, name), name, args, inputs, f"{backend}, {case}, given {given}")


@pytest.fixture
def cuda_kernels(device, monkeypatch):
    """Whether each call of the CUDA C++ backward launchers served (the Triton backend forced)."""
    from causal_conv1d_mps.cuda import launch, launch_btd

    return serve_through_cuda_launchers(device, monkeypatch, [(launch, "conv_bwd_bdt"), (launch_btd, "conv_bwd_btd")])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("op", ["causal_conv1d_bwd", "short_conv_fused_bwd"])
def test_the_cuda_kernels_road_returns_none_too(cuda_kernels, device, op, bias):
    """The Triton backend's return right after a CUDA C++ backward launch (the road of small calls on a GPU)."""
    from causal_conv1d_mps import triton as triton_backend

    gen = seeded(53)
    weight = _rand(8, 4, gen=gen, device=device)
    b = _rand(8, gen=gen, device=device) if bias else None
    bf16 = functools.partial(_rand, gen=gen, device=device, dtype=torch.bfloat16)
    if op == "causal_conv1d_bwd":
        args = (bf16(2, 8, 32), weight, b, None, None, bf16(2, 8, 32), None, SILU)
    else:
        args = (bf16(2, 32, 8), weight, b, None, None, None, bf16(2, 32, 8), None, SILU, True)
    grads = getattr(triton_backend, op)(*args)
    assert cuda_kernels and all(cuda_kernels), f"the CUDA C++ launchers declined: {cuda_kernels}"
    assert grads[3] is None, f"{op}: dinitial_states {type(grads[3]).__name__}"
    if bias:
        assert isinstance(grads[2], torch.Tensor) and grads[2].shape == (8,) and grads[2].dtype == b.dtype
    else:
        assert grads[2] is None, f"{op}: dbias {type(grads[2]).__name__}"


@pytest.mark.parametrize("name", ["causal_conv1d_bwd", "short_conv_fused_bwd"])
def test_the_custom_ops_put_a_new_empty_tensor_in_their_place(backend, device, name):
    """The schema returns tensors: eagerly through the dispatcher and under torch.compile the op returns empty
    ones of x's dtype and device for dbias and dinitial_states, new ones on every call."""
    op = getattr(torch.ops.causal_conv1d_mps, name)
    case = "conv [B, D, T]" if name == "causal_conv1d_bwd" else "fused with a mask"
    args = CASES[case](device)[1]
    x = args[0]
    first, second = op(*args), op(*args)
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True, backend="aot_eager")
    third = compiled(*args)
    for grads in (first, second, third):
        for absent in grads[2:]:
            assert isinstance(absent, torch.Tensor), type(absent)
            assert absent.shape == (0,) and absent.dtype == x.dtype and absent.device == x.device, absent
        torch.testing.assert_close(grads[0], first[0])
        torch.testing.assert_close(grads[1], first[1])
    assert first[2] is not second[2] and first[3] is not second[3] and first[2] is not first[3]


ENTRIES = {
    "causal_conv1d": lambda x, w, **k: ccmps.causal_conv1d(x.transpose(1, 2), w, None, "silu", **k).transpose(1, 2),
    "short_conv_fused": lambda x, w, **k: ccmps.short_conv_fused(x, w, **k),
}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_public_gradients_without_bias_or_initial_states(device, monkeypatch, entry, compiled):
    """The gradients of x and weight through the public functions, eagerly (the backend's None) and under
    torch.compile (the custom op's empty tensors), match float64 autograd of the reference path."""
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "reference")
    gen = seeded(54)
    x, w = _rand(B, T, D, gen=gen, device=device).requires_grad_(), _rand(D, 4, gen=gen, device=device).requires_grad_()
    dout = _rand(B, T, D, gen=gen, device=device)
    call = ENTRIES[entry]
    if compiled:
        call = torch.compile(call, fullgraph=True, backend="aot_eager")
    call(x, w).backward(dout)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ENTRIES[entry](x64, w64).backward(dout.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
