"""The `torch.library` contract (docs/CONTRACT.md section 1): opcheck for every op, float64 gradcheck, torch.compile.

Runs on CPU through the reference backend: what is checked here is the op registration (schema,
fake, autograd), which every backend shares.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import causal_conv1d_mps as ccmps

NS = "causal_conv1d_mps"


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "reference")


def registered_ops() -> set[str]:
    """Every op of the namespace, from the dispatcher's registry (`name.overload`)."""
    names = set()
    for qualified in torch._C._dispatch_get_all_op_names():
        if qualified.startswith(f"{NS}::"):
            name, _, overload = qualified[len(NS) + 2 :].partition(".")
            names.add(f"{name}.{overload or 'default'}")
    return names


def _copy_arg(value, grad_enabled=True):
    """A copy taken before the call; it requires grad only where the call could record a graph
    (a backward op runs under no_grad, and needs no double-backward formula)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad and grad_enabled)
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_arg(v, grad_enabled) for v in value)
    return value


class RecordOps(TorchDispatchMode):
    """Records each call of a `causal_conv1d_mps` op (with copies of its arguments taken before the call).

    Inside a dispatch mode the api cannot take its eager shortcut, so the public functions run
    through the registered ops, and their backward through the registered autograd formulas.
    """

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == NS:
            grad = torch.is_grad_enabled()
            self.calls.append((func, _copy_arg(args, grad), _copy_arg(kwargs, grad)))
        return func(*args, **kwargs)


def _exercise_every_public_function():
    """Calls of the public API that together reach every op, forward and backward."""
    g = torch.Generator().manual_seed(70)

    def rnd(*shape, grad=False):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    b, d, t, w = 2, 5, 11, 4
    weight, bias = rnd(d, w, grad=True), rnd(d, grad=True)
    seq_idx = torch.tensor([[0] * 5 + [1] * 6, [2] * 9 + [-1] * 2], dtype=torch.int32)
    out, final = ccmps.causal_conv1d(rnd(b, d, t, grad=True), weight, bias, "silu", seq_idx=seq_idx,
                                     initial_states=rnd(b, d, w - 1, grad=True), return_final_states=True)
    (out.sum() + final.square().sum()).backward()
    ccmps.causal_conv1d(rnd(b, t, d, grad=True).transpose(1, 2), weight).sum().backward()

    mask = torch.rand(b, t, generator=g) > 0.3
    out, final = ccmps.short_conv_fused(rnd(b, t, d, grad=True), weight, bias, mask,
                                        initial_states=rnd(b, d, w - 1, grad=True), return_final_states=True)
    (out.sum() + final.square().sum()).backward()
    cu = torch.tensor([0, 3, 3, 11], dtype=torch.int32)
    ccmps.short_conv_fused(rnd(1, t, d, grad=True), weight, None, cu_seqlens=cu).sum().backward()

    state = rnd(b, d, w + 1)
    ccmps.short_conv_update(rnd(b, 3, d), state, weight.detach(), bias.detach())
    ccmps.short_conv_update(rnd(b, d), rnd(4, d, w), weight.detach(), None, torch.tensor([5, 1], dtype=torch.int32),
                            conv_state_indices=torch.tensor([3, -1], dtype=torch.int32))
    ccmps.short_conv_update(rnd(b, 2, d, grad=True), state, weight, bias).sum().backward()
    ccmps.causal_conv1d_varlen_states(rnd(t, d), cu, w - 1)


@pytest.fixture(scope="module")
def recorded_calls():
    with RecordOps() as recorder:
        _exercise_every_public_function()
    return recorder.calls


def test_public_api_reaches_every_registered_op(recorded_calls):
    reached = {f"{func._opname}.{func._overloadname}" for func, _, _ in recorded_calls}
    missing = registered_ops() - reached
    assert registered_ops(), f"no op registered in namespace {NS}"
    assert not missing, f"ops never reached by the public API (so not opchecked): {sorted(missing)}"


def test_opcheck_every_op(recorded_calls):
    """`torch.library.opcheck` (schema, fake tensor, autograd registration, AOT dispatch) per recorded call."""
    failures = []
    checked = set()
    for func, args, kwargs in recorded_calls:
        try:
            torch.library.opcheck(func, _copy_arg(args), _copy_arg(kwargs))
        except Exception as exc:  # collect them all: one op's failure should not hide another's
            failures.append(f"{func}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        checked.add(str(func))
    assert not failures, "opcheck failed:\n" + "\n".join(failures)
    assert len(checked) >= len(registered_ops())


class _PassThrough(TorchDispatchMode):
    """Forces the api through the registered ops and their `register_autograd` formulas."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


ROUTES = ["eager", "custom_op"]


def _route(name):
    return _PassThrough() if name == "custom_op" else contextlib.nullcontext()


def _f64(*shape, generator):
    return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(True)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("channel_last", [False, True])
def test_gradcheck_causal_conv1d(route, channel_last):
    """Gradients of out and final_states w.r.t. x, weight, bias, initial_states (with seq_idx and padding)."""
    g = torch.Generator().manual_seed(71)
    b, d, t, w = 2, 3, 7, 3
    x = _f64(b, t, d, generator=g) if channel_last else _f64(b, d, t, generator=g)
    weight, bias, states = _f64(d, w, generator=g), _f64(d, generator=g), _f64(b, d, w - 1, generator=g)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 1, -1], [4, 4, 4, 4, 4, 4, 4]], dtype=torch.int32)

    def fn(x, weight, bias, states):
        xv = x.transpose(1, 2) if channel_last else x
        return ccmps.causal_conv1d(xv, weight, bias, "silu", seq_idx=seq_idx, initial_states=states,
                                   return_final_states=True)

    with _route(route):
        assert torch.autograd.gradcheck(fn, (x, weight, bias, states))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("packed", [False, True], ids=["batched", "cu_seqlens"])
def test_gradcheck_short_conv_fused(route, packed):
    """Gradients of out and final states w.r.t. x, weight, bias, initial_states (mask, cu_seqlens)."""
    g = torch.Generator().manual_seed(72)
    d, w = 3, 3
    if packed:
        b, t, rows = 1, 8, 3
        cu = torch.tensor([0, 2, 2, 8], dtype=torch.int32)
    else:
        b, t, rows, cu = 2, 6, 2, None
    x, weight, bias = _f64(b, t, d, generator=g), _f64(d, w, generator=g), _f64(d, generator=g)
    states = _f64(rows, d, w - 1, generator=g)
    mask = torch.rand(b, t, generator=g, dtype=torch.float64)

    def fn(x, weight, bias, states):
        return ccmps.short_conv_fused(x, weight, bias, mask, True, True, initial_states=states,
                                      return_final_states=True, cu_seqlens=cu)

    with _route(route):
        assert torch.autograd.gradcheck(fn, (x, weight, bias, states))


@pytest.mark.parametrize("mode", ["shift", "circular"])
def test_gradcheck_short_conv_update(mode):
    g = torch.Generator().manual_seed(73)
    b, length, d, w, size = 2, 3, 3, 3, 4
    x, weight, bias = _f64(b, length, d, generator=g), _f64(d, w, generator=g), _f64(d, generator=g)
    state = torch.randn(b, d, size, generator=g, dtype=torch.float64)
    seqlens = torch.tensor([1, 6], dtype=torch.int32) if mode == "circular" else None

    def fn(x, weight, bias):  # a fresh copy of the state per call: the step mutates it
        return ccmps.short_conv_update(x, state.clone(), weight, bias, seqlens, True, True)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))


class _TinyCanonModel(torch.nn.Module):
    """Projection -> short convolution (the Canon-layer pattern) -> projection."""

    def __init__(self, d=8, width=4):
        super().__init__()
        self.inp = torch.nn.Linear(d, 2 * d)
        self.conv = ccmps.ShortConvolution(d, width, bias=True, residual=True)
        self.out = torch.nn.Linear(d, d)

    def forward(self, x, mask, cache):
        gate, h = self.inp(x).chunk(2, dim=-1)  # h is a strided slice of the projection
        y, new_cache = self.conv(h, attention_mask=mask, cache=cache)
        return self.out(y * torch.sigmoid(gate)), new_cache


@pytest.mark.parametrize("compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(compile_backend):
    """`torch.compile(fullgraph=True)` traces the module (no graph break); forward and backward match eager."""
    torch.manual_seed(74)
    model = _TinyCanonModel()
    x = torch.randn(2, 9, 8)
    mask = torch.rand(2, 9) > 0.2
    cache = torch.randn(2, 8, 3)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)

    def run(fn):
        model.zero_grad()
        y, new_cache = fn(x, mask, cache)
        (y.square().sum() + new_cache.sum()).backward()
        return [y.detach(), new_cache.detach()] + [p.grad.clone() for p in model.parameters()]

    eager, traced = run(model), run(compiled)
    names = ["y", "new_cache"] + [n for n, _ in model.named_parameters()]
    for name, want, got in zip(names, eager, traced):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_compile_fullgraph_decode_step():
    """The in-place decode step traces too, and the compiled step updates the caller's cache."""
    torch.manual_seed(75)
    module = ccmps.ShortConvolution(8, 4, bias=True)
    x = torch.randn(2, 8)
    eager_cache, compiled_cache = torch.randn(2, 8, 3), None
    compiled_cache = eager_cache.clone()
    torch._dynamo.reset()
    step = torch.compile(module.step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want, _ = module.step(x, eager_cache)
        got, _ = step(x, compiled_cache)
    torch.testing.assert_close(got, want)
    assert torch.equal(compiled_cache, eager_cache), "the compiled step must update the cache in place"


def test_compile_fullgraph_with_value_arguments():
    """Index and boundary tensors (`conv_state_indices`, `cu_seqlens`) on CPU trace without a graph break:
    their values are checked in eager mode only (docs/CONTRACT.md section 8)."""
    torch.manual_seed(76)
    d, width = 8, 4
    w, b = torch.randn(d, width), torch.randn(d)
    x, states = torch.randn(2, d), torch.randn(3, d, width - 1)
    slots = torch.tensor([2, 0], dtype=torch.int32)
    packed, cu = torch.randn(1, 11, d), torch.tensor([0, 4, 11], dtype=torch.int32)
    torch._dynamo.reset()
    step = torch.compile(lambda x, s, i: ccmps.short_conv_update_fwd_only(x, s, w, b, conv_state_indices=i),
                         fullgraph=True, backend="aot_eager")
    fused = torch.compile(lambda x, c: ccmps.short_conv_fused_fwd_only(x, w, b, cu_seqlens=c),
                          fullgraph=True, backend="aot_eager")
    eager_states, compiled_states = states.clone(), states.clone()
    torch.testing.assert_close(step(x, compiled_states, slots),
                               ccmps.short_conv_update_fwd_only(x, eager_states, w, b, conv_state_indices=slots))
    assert torch.equal(compiled_states, eager_states)
    torch.testing.assert_close(fused(packed, cu), ccmps.short_conv_fused_fwd_only(packed, w, b, cu_seqlens=cu))
