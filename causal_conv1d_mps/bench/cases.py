"""One benchmark row made concrete: its inputs, the callables compared, the oracle, the bytes.

Every implementation is a forward function `fn(inputs) -> out` over a dict of input tensors;
`Case.wrap` turns it into the timed call, which returns the tensors to check: `(out,)`,
`(out, state)` for the decode step (the state is updated in place), or
`(out, dx, dweight, dbias)` for forward + backward rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import baselines, oracle, traffic
from .suites import Spec

Inputs = dict[str, torch.Tensor]
GRAD_KEYS = ("x", "weight", "bias")
MASK_DTYPE = torch.int64  # what Hugging Face models pass as attention_mask


@dataclass(frozen=True)
class Output:
    name: str
    channel_dim: int  # the dimension of D, along which the check is chunked
    exact: bool = False  # decode states are copies of inputs: must match bit for bit


@dataclass
class Case:
    spec: Spec
    dtype: torch.dtype
    device: torch.device
    bytes: int
    input_channel_dims: dict[str, int | None]  # None: not sliced by channel (the mask)
    outputs: list[Output]
    ours: Callable[[Inputs], torch.Tensor]
    eager: Callable[[Inputs], torch.Tensor]
    reference: Callable[[Inputs], tuple]  # float64 CPU inputs -> expected outputs
    make_inputs: Callable[[], Inputs]
    thirdparty: dict[str, Callable[[Inputs], torch.Tensor]] = field(default_factory=dict)

    @property
    def mutates_inputs(self) -> bool:
        return self.spec.op == "short_conv_update"

    def wrap(self, fn: Callable[[Inputs], torch.Tensor]) -> Callable[[Inputs], tuple]:
        """The timed call for `fn`: forward only, decode (out and updated state), or forward + backward."""
        if self.spec.backward:
            def forward_backward(s: Inputs) -> tuple:
                out = fn(s)
                grads = torch.autograd.grad(out, [s[k] for k in GRAD_KEYS if s.get(k) is not None], s["dout"])
                return (out.detach(), *grads)
            return forward_backward
        if self.mutates_inputs:
            return lambda s: (fn(s), s["state"])
        return lambda s: (fn(s),)


def _randn(shape, dtype, device, scale=1.0) -> torch.Tensor:
    # Drawn in float32 on the device (every backend has that), then cast.
    return (torch.randn(shape, device=device) * scale).to(dtype)


def _padding_mask(batch: int, seqlen: int, device) -> torch.Tensor:
    """HF-style int64 `[B, T]`: odd rows left-padded by a quarter of the sequence."""
    mask = torch.ones(batch, seqlen, dtype=MASK_DTYPE)
    mask[1::2, : seqlen // 4] = 0
    return mask.to(device)


def _params(spec: Spec, dtype, device) -> Inputs:
    return {
        "weight": _randn((spec.D, spec.width), dtype, device, spec.width**-0.5),
        "bias": _randn((spec.D,), dtype, device, 0.5) if spec.bias else None,
    }


def _with_grad(s: Inputs, spec: Spec) -> Inputs:
    if spec.backward:
        for k in GRAD_KEYS:
            if s.get(k) is not None:
                s[k].requires_grad_(True)
        s["dout"] = _randn(tuple(s["x"].shape), s["x"].dtype, s["x"].device)
    return s


def _reference_with_grads(forward: Callable, spec: Spec) -> Callable[[Inputs], tuple]:
    """Float64 outputs, plus autograd gradients of `<out, dout>` for backward rows."""
    def reference(s: Inputs) -> tuple:
        if not spec.backward:
            return (forward(s),)
        leaves = {k: (s[k].clone().requires_grad_(True) if s.get(k) is not None else None) for k in GRAD_KEYS}
        out = forward({**s, **leaves})
        grads = torch.autograd.grad(out, [v for v in leaves.values() if v is not None], s["dout"])
        return (out.detach(), *grads)
    return reference


def _grad_outputs(spec: Spec, x_dim: int) -> list[Output]:
    if not spec.backward:
        return []
    grads = [Output("dx", x_dim), Output("dweight", 0)]
    return grads + ([Output("dbias", 0)] if spec.bias else [])


def _causal_conv1d_case(spec: Spec, dtype, device, ccmps, libs) -> Case:
    act = "silu" if spec.silu else None

    def make_inputs() -> Inputs:
        if spec.channel_last:  # the (B, D, T) view of a contiguous (B, T, D) tensor
            x = _randn((spec.B, spec.T, spec.D), dtype, device).transpose(1, 2)
        else:
            x = _randn((spec.B, spec.D, spec.T), dtype, device)
        return _with_grad({"x": x, **_params(spec, dtype, device)}, spec)

    thirdparty = {
        lib.name: (lambda s, f=lib.causal_conv1d: f(s["x"], s["weight"], s["bias"], spec.silu))
        for lib in libs
        if lib.causal_conv1d is not None
    }
    es = dtype.itemsize
    nbytes = (traffic.forward_backward_bytes if spec.backward else traffic.forward_bytes)(spec.B, spec.T, spec.D, es)
    forward64 = lambda s: oracle.conv_channel_first(s["x"], s["weight"], s["bias"], spec.silu)  # noqa: E731
    return Case(
        spec, dtype, device, nbytes,
        input_channel_dims={"x": 1, "weight": 0, "bias": 0, "dout": 1},
        outputs=[Output("out", 1), *_grad_outputs(spec, 1)],
        ours=lambda s: ccmps.causal_conv1d(s["x"], s["weight"], s["bias"], act),
        eager=lambda s: baselines.eager_causal_conv1d(s["x"], s["weight"], s["bias"], spec.silu),
        reference=_reference_with_grads(forward64, spec),
        make_inputs=make_inputs,
        thirdparty=thirdparty,
    )


def _short_conv_fused_case(spec: Spec, dtype, device, ccmps, libs) -> Case:
    if spec.backward and spec.row_stride:
        raise ValueError(f"{spec.name}: backward rows take a contiguous x (row_stride must be 0)")

    def make_inputs() -> Inputs:
        if spec.row_stride:  # a slice of a wider projection output, read in place
            x = _randn((spec.B, spec.T, spec.row_stride), dtype, device)[..., spec.row_stride - spec.D :]
        else:
            x = _randn((spec.B, spec.T, spec.D), dtype, device)
        s = {"x": x, **_params(spec, dtype, device)}
        s["mask"] = _padding_mask(spec.B, spec.T, device) if spec.mask else None
        return _with_grad(s, spec)

    def call(f):
        return lambda s: f(s["x"], s["weight"], s["bias"], s["mask"], spec.silu, spec.residual)

    thirdparty = {lib.name: call(lib.short_conv_fused) for lib in libs if lib.short_conv_fused is not None}
    es = dtype.itemsize
    if spec.backward:
        nbytes = traffic.forward_backward_bytes(spec.B, spec.T, spec.D, es)
        nbytes += 2 * traffic.mask_bytes(spec.B, spec.T, MASK_DTYPE.itemsize) if spec.mask else 0
    else:
        nbytes = traffic.forward_bytes(spec.B, spec.T, spec.D, es)
        nbytes += traffic.mask_bytes(spec.B, spec.T, MASK_DTYPE.itemsize) if spec.mask else 0
    return Case(
        spec, dtype, device, nbytes,
        input_channel_dims={"x": 2, "weight": 0, "bias": 0, "mask": None, "dout": 2},
        outputs=[Output("out", 2), *_grad_outputs(spec, 2)],
        ours=lambda s: ccmps.short_conv_fused(
            s["x"], s["weight"], s["bias"], attention_mask=s["mask"], activation=spec.silu, residual=spec.residual
        ),
        eager=call(baselines.eager_short_conv_fused),
        reference=_reference_with_grads(call(oracle.short_conv_fused), spec),
        make_inputs=make_inputs,
        thirdparty=thirdparty,
    )


def _decode_case(spec: Spec, dtype, device, ccmps, libs) -> Case:
    # The state holds the last W inputs, as in Mamba-style caches that the roll-and-einsum step uses.
    def make_inputs() -> Inputs:
        state = _randn((spec.B, spec.D, spec.width), dtype, device)
        return {"x": _randn((spec.B, spec.D), dtype, device), "state": state, **_params(spec, dtype, device)}

    def call(f):
        return lambda s: f(s["x"], s["state"], s["weight"], s["bias"], spec.silu, spec.residual)

    thirdparty = {lib.name: call(lib.decode_step) for lib in libs if lib.decode_step is not None}
    es = dtype.itemsize
    return Case(
        spec, dtype, device, traffic.decode_bytes(spec.B, spec.D, spec.width, es),
        input_channel_dims={"x": 1, "state": 1, "weight": 0, "bias": 0},
        outputs=[Output("out", 1), Output("state", 1, exact=True)],
        ours=lambda s: ccmps.short_conv_update(
            s["x"], s["state"], s["weight"], s["bias"], activation=spec.silu, residual=spec.residual
        ),
        eager=call(baselines.eager_decode_step),
        reference=lambda s: call(oracle.decode_step)(s),
        make_inputs=make_inputs,
        thirdparty=thirdparty,
    )


_BUILDERS = {
    "causal_conv1d": _causal_conv1d_case,
    "short_conv_fused": _short_conv_fused_case,
    "short_conv_update": _decode_case,
}


def build_case(spec: Spec, dtype: torch.dtype, device: torch.device, ccmps, libs) -> Case:
    """`ccmps` is the package module (its public API); `libs` the importable third-party libraries."""
    return _BUILDERS[spec.op](spec, dtype, device, ccmps, libs)
