"""The device and backend under check, the dtypes they serve, and the facts printed at the top of the report."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from .. import _backend
from ..bench import devices
from .serving import first_line

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHORT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Target:
    device: torch.device
    backend: str  # the backend requested for every call
    forced: bool  # by --backend or CAUSAL_CONV1D_BACKEND, rather than the device's default
    unavailable: str | None  # why that backend cannot run on this device at all (every call then falls back)


def choose_target(device: torch.device, backend: str | None) -> Target:
    """`backend` None: what the package uses on `device` (CAUSAL_CONV1D_BACKEND if the user set it)."""
    forced = backend is not None or bool(os.environ.get(_backend.ENV_VAR))
    name = backend if backend is not None else _backend.requested_backend(device)
    return Target(device, name, forced, _backend.backend_unavailable_reason(name, device))


@contextmanager
def backend_forced(name: str) -> Iterator[None]:
    """Every call inside the block asks for backend `name` (the package reads the variable at call time)."""
    previous = os.environ.get(_backend.ENV_VAR)
    os.environ[_backend.ENV_VAR] = name
    _backend.clear_cache()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_backend.ENV_VAR, None)
        else:
            os.environ[_backend.ENV_VAR] = previous
        _backend.clear_cache()


def _device_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when plain PyTorch computes in `dtype` on `device` (MPS has no bfloat16 before macOS 14)."""
    try:
        t = torch.ones(4, device=device, dtype=dtype)
        (t * 2 + t).sum().item()
    except Exception as e:  # whatever the device raises, the dtype cannot be checked there
        return f"PyTorch cannot compute in {dtype_name(dtype)} on {device.type} here: {first_line(e)}"
    return None


def dtype_support(target: Target) -> dict[torch.dtype, dict]:
    """Per dtype: `checked` (the device computes in it), `served_by` (the backend a call will reach), `reason`."""
    support = {}
    for dtype in DTYPES:
        problem = _device_problem(target.device, dtype)
        if problem is not None:
            support[dtype] = {"checked": False, "served_by": None, "reason": problem}
            continue
        reason = _backend.backend_unavailable_reason(target.backend, target.device, dtype)
        support[dtype] = {"checked": True, "served_by": "reference" if reason else target.backend, "reason": reason}
    return support


def environment(target: Target, support: dict[torch.dtype, dict], **fields) -> dict:
    """The report's header: versions, OS, device, backend, and per dtype what serves it."""
    return devices.header(
        target.device,
        backend=target.backend,
        backend_default=_backend._DEVICE_DEFAULT.get(target.device.type, "reference"),
        backend_forced=target.forced,
        backend_unavailable=target.unavailable,
        dtypes={dtype_name(d): s for d, s in support.items()},
        metal_path=os.environ.get("CAUSAL_CONV1D_METAL_PATH"),  # kernel sources replacing the packaged ones
        **fields,
    )
