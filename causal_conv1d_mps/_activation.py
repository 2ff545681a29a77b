"""The activations applied to the convolution's output, defined once for the API and every backend.

An activation is one integer `code` from the public functions down to the kernels: the op schemas carry it
(`activation: int`), the Triton kernels take it as the constexpr `ACTIVATION` (math in
`triton/kernels/common.py`: `activation`, `activation_grad`), the Metal kernels as the parameter slot
`ACTIVATION` compared with the generated constants `CC_ACTIVATION_<NAME>` (math in `metal/kernels/common.metal`:
`cc_activation`, `cc_activation_grad`), and the reference path uses `forward` and `derivative` below.
docs/BACKENDS.md lists the few places that adding one touches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Activation:
    """`name`: canonical name (MSL constant `CC_ACTIVATION_<NAME>`); `code`: the integer every layer passes;
    `spellings`: what users may pass for it; `forward(pre, inplace)`: the activation of the float
    pre-activation `pre` (any shape; with `inplace` it may overwrite `pre`); `derivative(pre)`: d forward / d pre
    at `pre`."""

    name: str
    code: int
    spellings: tuple
    forward: Callable[[Tensor, bool], Tensor]
    derivative: Callable[[Tensor], Tensor]


def _silu_derivative(pre: Tensor) -> Tensor:
    sig = torch.sigmoid(pre)
    return sig * (1 + pre * (1 - sig))


IDENTITY = 0
SILU = 1

ACTIVATIONS: tuple[Activation, ...] = (
    Activation("identity", IDENTITY, (None,), lambda pre, inplace: pre, torch.ones_like),
    Activation("silu", SILU, ("silu", "swish"),
               lambda pre, inplace: torch.nn.functional.silu(pre, inplace=inplace), _silu_derivative),
)
BY_CODE: dict[int, Activation] = {a.code: a for a in ACTIVATIONS}
_BY_SPELLING = {s: a.code for a in ACTIVATIONS for s in a.spellings}


def _accepted() -> str:
    names = [repr(s) for a in ACTIVATIONS for s in a.spellings]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def code(activation, name: str = "activation", *, allow_bool: bool = False) -> int:
    """The code of a user's `activation` (None, 'silu', 'swish'; with `allow_bool`, as the fused functions take
    it, True means SiLU and False none). Anything else is a ValueError naming `name` and the accepted values."""
    if isinstance(activation, bool):
        if allow_bool:
            return SILU if activation else IDENTITY
    elif activation is None or isinstance(activation, str):
        found = _BY_SPELLING.get(activation)
        if found is not None:
            return found
    raise ValueError(f"{name}: expected {_accepted()}{' (or True/False)' if allow_bool else ''}, "
                     f"got {activation!r}")


def forward(activation: int, pre: Tensor, inplace: bool = False) -> Tensor:
    """The activation `activation` (a code) of the pre-activation `pre`."""
    return BY_CODE[activation].forward(pre, inplace)


def derivative(activation: int, pre: Tensor) -> Tensor:
    """d activation / d pre at `pre` (the backward multiplies the incoming gradient by it)."""
    return BY_CODE[activation].derivative(pre)
