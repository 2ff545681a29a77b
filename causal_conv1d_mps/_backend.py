"""Which backend serves a call: the device's default, or the one forced by CAUSAL_CONV1D_BACKEND.

A backend that cannot run a call (no compiler, old PyTorch, an unsupported dtype) hands it to the
reference path on the same device, with one warning per distinct reason.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch

ENV_VAR = "CAUSAL_CONV1D_BACKEND"
BACKENDS = ("reference", "triton", "metal")
_MODULES = {"reference": "causal_conv1d_mps.reference",
            "triton": "causal_conv1d_mps.triton",
            "metal": "causal_conv1d_mps.metal"}
_DEVICE_DEFAULT = {"cuda": "triton", "mps": "metal"}

_selected: dict[tuple, ModuleType] = {}
_warned: set[str] = set()


# os.environ.get encodes the key and decodes the value on every call (about 0.7 us); on POSIX its byte
# mapping gives the same answer, still read at call time, for a twentieth of that.
_ENV_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_KEY = ENV_VAR.encode()


def _forced_value() -> str | bytes | None:
    if _ENV_BYTES is not None:
        return _ENV_BYTES.get(_ENV_KEY)
    return os.environ.get(ENV_VAR)


# `_forced_value` as one C-level call (no Python frame) where the byte mapping exists: the raw value of the
# variable now, compared by callers that keep a selected module (`Choice`) against the value it was chosen under
forced_value = functools.partial(_ENV_BYTES.get, _ENV_KEY) if _ENV_BYTES is not None else _forced_value


def requested_backend(device: torch.device) -> str:
    """The backend asked for on `device`: the environment variable (read at call time) or the default."""
    forced = _forced_value()
    if isinstance(forced, bytes):
        forced = forced.decode()
    if forced:
        name = forced.strip().lower()
        if name not in BACKENDS:
            raise ValueError(f"{ENV_VAR}: expected one of {', '.join(BACKENDS)}, got {forced!r}")
        return name
    return _DEVICE_DEFAULT.get(device.type, "reference")


def _load(name: str) -> ModuleType | str:
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:
        return f"cannot import {_MODULES[name]}: {exc}"


def backend_unavailable_reason(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None when backend `name` can run on `device` (for `dtype`, float32 if not given); else why not."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}"
    module = _load(name)
    if isinstance(module, str):
        return module
    return module.unsupported_reason(torch.device(device), dtype or torch.float32)


def select(device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The backend module that runs an op on `device` for an `x` of `dtype` (cached: this is on every call)."""
    # `_forced_value()` written out: this runs on every call
    key = (_ENV_BYTES.get(_ENV_KEY) if _ENV_BYTES is not None else os.environ.get(ENV_VAR), device, dtype)
    module = _selected.get(key)
    if module is None:
        module = _selected[key] = _resolve(requested_backend(device), device, dtype)
    return module


class Choice(tuple):
    """`(the raw value of CAUSAL_CONV1D_BACKEND, the module `select` chose under it)` for one device and dtype,
    kept by a caller per call signature: while `forced_value()` still equals the first field, the module is what
    `select` would answer, so that call may skip `select`. `clear_cache` empties the caller's table too
    (`on_clear`), since the module may then be chosen anew."""

    __slots__ = ()

    def __new__(cls, device: torch.device, dtype: torch.dtype):
        # through `select` itself (a global looked up at call time): the one place that chooses a backend
        return tuple.__new__(cls, (forced_value(), select(device, dtype)))


_on_clear: list = []


def on_clear(forget) -> None:
    """Calls `forget()` from `clear_cache`: for a table of `Choice`s kept elsewhere."""
    _on_clear.append(forget)


def _resolve(name: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    reference = importlib.import_module(_MODULES["reference"])
    if name == "reference":
        return reference
    reason = backend_unavailable_reason(name, device, dtype)
    if reason is None:
        return _load(name)
    message = (f"causal_conv1d_mps: the {name} backend cannot run on {device.type} with {dtype}: {reason}; "
               f"using the PyTorch reference path instead")
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    return reference


def clear_cache() -> None:
    """Forget resolved backends and issued warnings (tests that change the environment use this)."""
    _selected.clear()
    _warned.clear()
    for forget in _on_clear:
        forget()
