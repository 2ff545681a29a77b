"""The activation registry (`causal_conv1d_mps._activation`): one definition from the API to every kernel.

Unmarked tests check the registry itself and that no kernel source defines an activation code of its own;
the backend tests run every registered activation through every backend and compare it, outputs and
gradients, with the float64 oracle's pre-activation passed through the registry's torch function.
"""
from __future__ import annotations

import re

import pytest
import torch

import causal_conv1d_mps as ccmps
import oracle
from causal_conv1d_mps import _activation
from causal_conv1d_mps.metal import _contract, _loader
from conftest import REPO_ROOT, assert_close_rel, leaf, leaf64, make_params, oracle_grads, randn, seeded

ACTIVATIONS = _activation.ACTIVATIONS
TRITON_KERNELS = REPO_ROOT / "causal_conv1d_mps" / "triton" / "kernels"


def _spelling(act: _activation.Activation):
    return act.spellings[0]


# ---------------------------------------------------------------------------------------------------------
# The registry


def test_codes_names_and_spellings_are_unique():
    assert len({a.code for a in ACTIVATIONS}) == len(ACTIVATIONS)
    assert len({a.name for a in ACTIVATIONS}) == len(ACTIVATIONS)
    spellings = [s for a in ACTIVATIONS for s in a.spellings]
    assert len(set(spellings)) == len(spellings)
    assert _activation.BY_CODE[_activation.IDENTITY].spellings == (None,)
    assert set(_activation.BY_CODE[_activation.SILU].spellings) == {"silu", "swish"}


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.name)
def test_every_spelling_maps_to_its_code(act):
    for spelling in act.spellings:
        assert _activation.code(spelling) == act.code
        assert _activation.code(spelling, allow_bool=True) == act.code


def test_bools_are_accepted_only_where_asked():
    assert _activation.code(True, allow_bool=True) == _activation.SILU
    assert _activation.code(False, allow_bool=True) == _activation.IDENTITY
    with pytest.raises(ValueError, match=r"activation: expected None, 'silu' or 'swish', got True"):
        _activation.code(True)


@pytest.mark.parametrize("bad", ["relu", "SiLU", 1, 0, [], "none"])
def test_other_values_raise_naming_the_argument_and_every_accepted_value(bad):
    with pytest.raises(ValueError, match=re.escape(f"act: expected None, 'silu' or 'swish', got {bad!r}")):
        _activation.code(bad, "act")
    with pytest.raises(ValueError, match=re.escape(f"expected None, 'silu' or 'swish' (or True/False), got {bad!r}")):
        _activation.code(bad, allow_bool=True)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.name)
def test_derivative_is_the_derivative_of_forward(act):
    pre = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(act.forward(pre, False).sum(), pre)
    assert torch.allclose(act.derivative(pre.detach()), grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# The registry is the only place that defines codes


def test_the_metal_header_defines_exactly_the_registry_codes():
    header = _contract.msl_header()
    defined = dict(re.findall(r"^#define CC_ACTIVATION_(\w+) (-?\d+)$", header, re.M))
    assert defined == {a.name.upper(): str(a.code) for a in ACTIVATIONS}


def test_no_kernel_source_defines_or_hard_codes_an_activation_code():
    problems = []
    for path in sorted(_loader.KERNEL_DIR.glob("*.metal")):
        code = re.sub(r"//[^\n]*|/\*.*?\*/", "", path.read_text(encoding="ascii"), flags=re.S)
        problems += [f"{path.name}: defines {m}" for m in re.findall(r"#\s*define\s+(CC_ACTIVATION\w*)", code)]
        problems += [f"{path.name}: compares an activation with {m}" for m in
                     re.findall(r"activation\s*[!=]=\s*(\d+)|case\s+(\d+)\s*:", code)]
    for path in sorted(TRITON_KERNELS.glob("*.py")):
        code = path.read_text()
        problems += [f"{path.name}: compares ACTIVATION with {m}" for m in
                     re.findall(r"ACTIVATION\s*[!=]=\s*(\d+)", code)]
        problems += [f"{path.name}: defines {m} itself" for m in
                     re.findall(r"^(IDENTITY|SILU)\s*=\s*tl\.constexpr\((\d+)\)", code, re.M)]
    assert not problems, problems


def test_metal_common_implements_every_registered_activation():
    """`cc_activation` has a case for every code, and `cc_activation_grad` for every code but the identity
    (whose derivative, 1, is its default)."""
    code = (_loader.KERNEL_DIR / "common.metal").read_text(encoding="ascii")
    for function in ("cc_activation", "cc_activation_grad"):
        body = re.search(rf"inline float {function}\(long code, float v\) \{{(.*?)\n\}}", code, re.S).group(1)
        cases = set(re.findall(r"case CC_ACTIVATION_(\w+):", body))
        expected = {a.name.upper() for a in ACTIVATIONS if a.code != _activation.IDENTITY}
        assert cases == expected, f"{function}: cases {sorted(cases)}, registry {sorted(expected)}"


def test_the_triton_constants_are_the_registry_codes():
    from causal_conv1d_mps.triton.kernels import common

    for act in ACTIVATIONS:
        assert getattr(common, act.name.upper()).value == act.code


# ---------------------------------------------------------------------------------------------------------
# Every backend implements every registered activation


def _check_grads(outs, refs, inputs, inputs64, dtype, what):
    cots = [randn(*o.shape, device=o.device, generator=seeded(7 + i)) for i, o in enumerate(outs)]
    got = torch.autograd.grad(outs, [t for t in inputs if t is not None], cots)
    want = [g for g in oracle_grads(refs, cots, inputs64) if g is not None]
    for name, g, w in zip(("x", "weight", "bias", "states"), got, want):
        assert_close_rel(g, w, dtype, f"{what} d{name}")


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.name)
def test_causal_conv1d_runs_every_activation(backend, device, act):
    gen = seeded(21)
    x = randn(2, 5, 17, device=device, generator=gen)
    weight, bias = make_params(5, 4, torch.float32, device, gen)
    states = randn(2, 5, 3, device=device, generator=gen)
    inputs = [leaf(t) for t in (x, weight, bias, states)]
    out, final = ccmps.causal_conv1d(inputs[0], inputs[1], inputs[2], _spelling(act), initial_states=inputs[3],
                                     return_final_states=True)
    inputs64 = [leaf64(t) for t in (x, weight, bias, states)]
    pre, final64 = oracle.causal_conv1d(inputs64[0], inputs64[1], inputs64[2], None, initial_states=inputs64[3])
    ref = act.forward(pre, False)
    assert_close_rel(out, ref, torch.float32, f"{act.name} out")
    _check_grads([out, final], [ref, final64], inputs, inputs64, torch.float32, act.name)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.name)
def test_short_conv_fused_runs_every_activation(backend, device, act):
    gen = seeded(22)
    x = randn(2, 13, 6, device=device, generator=gen)
    weight, bias = make_params(6, 3, torch.float32, device, gen)
    mask = (torch.arange(13)[None, :] < torch.tensor([[13], [9]])).to(device)
    inputs = [leaf(t) for t in (x, weight, bias)]
    out = ccmps.short_conv_fused(inputs[0], inputs[1], inputs[2], mask, _spelling(act), residual=True)
    inputs64 = [leaf64(t) for t in (x, weight, bias)]
    pre, _ = oracle.short_conv_fused(inputs64[0], inputs64[1], inputs64[2], mask.cpu(), activation=False,
                                     residual=False)
    ref = act.forward(pre, False) + inputs64[0]
    assert_close_rel(out, ref, torch.float32, f"{act.name} out")
    _check_grads([out], [ref], inputs, inputs64, torch.float32, act.name)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.name)
def test_short_conv_update_runs_every_activation(backend, device, act):
    gen = seeded(23)
    x = randn(3, 2, 7, device=device, generator=gen)
    weight, bias = make_params(7, 4, torch.float32, device, gen)
    state = randn(3, 7, 5, device=device, generator=gen)
    pre, new_state = oracle.short_conv_update(x, state, weight, bias, activation=False, residual=False)
    out = ccmps.short_conv_update(x, state, weight, bias, activation=_spelling(act), residual=False)
    assert_close_rel(out, act.forward(pre, False), torch.float32, f"{act.name} out")
    assert torch.equal(state.cpu(), new_state)
