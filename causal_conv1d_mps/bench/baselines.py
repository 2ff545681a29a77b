"""What a user would run instead of this package, on the same device and dtype.

`eager_*`: the plain PyTorch a user writes (depthwise `F.conv1d(groups=D)` with padding, then a
slice; the roll-and-einsum decode step of Mamba-style code). `thirdparty()` finds the optional
libraries: Dao-AILab `causal_conv1d` and flash-linear-attention (`fla`), when importable.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def eager_causal_conv1d(x, weight, bias, silu: bool):
    """`x` `[B, D, T]`: pad by `W-1` on both sides, convolve, keep the first `T` outputs."""
    dim, width = weight.shape
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=dim)[..., : x.shape[-1]]
    return F.silu(out) if silu else out


def eager_short_conv_fused(x, weight, bias, mask, silu: bool, residual: bool):
    """`x` `[B, T, D]`: mask, transpose to channel-first, convolve, transpose back, + residual."""
    masked = x if mask is None else x * mask.unsqueeze(-1).to(x.dtype)
    out = eager_causal_conv1d(masked.transpose(1, 2), weight, bias, silu).transpose(1, 2)
    return out + x if residual else out


def eager_decode_step(x, state, weight, bias, silu: bool, residual: bool):
    """Mamba-style step: roll the `[B, D, W]` state, write the token, reduce with einsum."""
    state.copy_(torch.roll(state, shifts=-1, dims=-1))
    state[:, :, -1] = x
    out = torch.einsum("bdw,dw->bd", state, weight)
    if bias is not None:
        out = out + bias
    if silu:
        out = F.silu(out)
    return out + x if residual else out


@dataclass(frozen=True)
class ThirdParty:
    """Callables of an optional library in this benchmark's argument conventions (None = not offered)."""

    name: str
    version: str
    causal_conv1d: Callable | None = None  # (x [B,D,T], weight, bias, silu) -> out
    short_conv_fused: Callable | None = None  # (x [B,T,D], weight, bias, mask, silu, residual) -> out
    decode_step: Callable | None = None  # (x [B,D], state [B,D,S], weight, bias, silu, residual) -> out


def _version(module, *distributions: str) -> str:
    """The module's `__version__`, else the first installed distribution's (fla-core has no `__version__`)."""
    version = getattr(module, "__version__", None)
    for dist in distributions:
        if version is not None:
            break
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return str(version or "unknown")


def _dao() -> ThirdParty:
    dao = importlib.import_module("causal_conv1d")
    fn, update = dao.causal_conv1d_fn, dao.causal_conv1d_update

    def conv(x, weight, bias, silu):
        return fn(x, weight, bias, activation="silu" if silu else None)

    def fused(x, weight, bias, mask, silu, residual):
        # Dao has no mask or residual: mask first, run the channel-last layout, add separately.
        masked = x if mask is None else x * mask.unsqueeze(-1).to(x.dtype)
        out = fn(masked.transpose(1, 2), weight, bias, activation="silu" if silu else None).transpose(1, 2)
        return out + x if residual else out

    def step(x, state, weight, bias, silu, residual):
        out = update(x, state, weight, bias, activation="silu" if silu else None)
        return out + x if residual else out

    return ThirdParty("dao", _version(dao, "causal-conv1d"), conv, fused, step)


def _fla() -> ThirdParty:
    fn = None
    # the module's name across releases (0.6 moved it to a package of its own)
    for path in ("fla.modules.causal_conv1d", "fla.modules.convolution", "fla.modules.conv"):
        try:
            fn = importlib.import_module(path).causal_conv1d
            break
        except (ImportError, AttributeError):
            continue
    if fn is None:
        raise ImportError("no causal_conv1d in fla.modules.causal_conv1d, fla.modules.convolution or fla.modules.conv")

    def fused(x, weight, bias, mask, silu, residual):
        # fla's ShortConvolution multiplies by the mask before calling this function.
        masked = x if mask is None else x * mask.unsqueeze(-1).to(x.dtype)
        out = fn(masked, weight, bias, residual=x if residual else None, activation="silu" if silu else None)
        return out[0] if isinstance(out, tuple) else out

    def conv(x, weight, bias, silu):
        # fla works in [B, T, D]; the channel-first input is transposed both ways, as a user would.
        out = fn(x.transpose(1, 2), weight, bias, activation="silu" if silu else None)
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

    return ThirdParty("fla", _version(importlib.import_module("fla"), "fla-core", "flash-linear-attention"),
                      conv, fused, None)


def thirdparty(device: torch.device) -> tuple[list[ThirdParty], dict[str, str]]:
    """`(usable libraries, {name: why not} for those installed but unusable)`.

    Both libraries need CUDA (or ROCm): none are used on cpu or mps.
    """
    usable: list[ThirdParty] = []
    unusable: dict[str, str] = {}
    if device.type != "cuda":
        return usable, unusable
    for name, module, load in (("dao", "causal_conv1d", _dao), ("fla", "fla", _fla)):
        if importlib.util.find_spec(module) is None:
            continue  # not installed: no column, no message
        try:
            usable.append(load())
        except Exception as e:  # a broken optional install must not stop the benchmark; the header says why
            unusable[name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return usable, unusable
