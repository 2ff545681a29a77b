"""Compile the CUDA C++ kernels at first use and launch them.

On a CUDA device the source goes through NVRTC, which PyTorch's CUDA wheels carry, by way of
`torch.cuda._compile_kernel` (compile to PTX, load the module); the launch calls the driver's
`cuLaunchKernel` on the current stream, so CUDA-graph capture records it like any PyTorch kernel. Each
variant (the contract's defines) compiles once per process and device (about 0.1-0.3 s).

On CPU tensors the same source runs through `cuda_harness` (the repository's test-only CPU harness, not
installed with the package): that is how CI checks these kernels without a GPU.

Nothing here raises for a missing compiler: `kernel()` returns None with the reason kept in
`unavailable_reason()`, and the launchers then use the Triton kernels. A compile error of the shipped
source is a bug of this package: it warns once, quoting the compiler, and the Triton kernels serve.
"""
from __future__ import annotations

import ctypes
import os
import struct
import threading
import warnings

import torch

from .. import _checkout
from . import _source

_lock = threading.Lock()
_kernels: dict[tuple, object] = {}
_failed: dict[str, str] = {}  # device type -> reason
_libcuda = None


def enabled() -> bool:
    """`CAUSAL_CONV1D_CUDA_KERNELS=0` turns the CUDA C++ kernels off (the Triton kernels serve every call)."""
    return os.environ.get("CAUSAL_CONV1D_CUDA_KERNELS", "1") != "0"


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run on `device` (None: they can, or have not been tried yet)."""
    if not enabled():
        return "turned off by CAUSAL_CONV1D_CUDA_KERNELS=0"
    if device.type == "cuda" and not hasattr(torch.cuda, "_compile_kernel"):
        return f"torch {torch.__version__} has no torch.cuda._compile_kernel (NVRTC)"
    return _failed.get(device.type)


def kernel(name: str, defines: dict[str, int], device: torch.device):
    """The compiled kernel `name` of the variant `defines` for `device`, or None (see `unavailable_reason`)."""
    if unavailable_reason(device) is not None:
        return None
    index = device.index if device.type == "cuda" and device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else -1)
    key = (name, device.type, index, *defines.items())  # the launchers build `defines` in one order
    found = _kernels.get(key)
    if found is not None:
        return found
    with _lock:
        found = _kernels.get(key)
        if found is None:
            found = _compile(name, defines, device, index)
            if found is not None:
                _kernels[key] = found
    return found


def _compile(name: str, defines: dict[str, int], device: torch.device, index: int):
    text = _source.source(name, defines)
    try:
        if device.type == "cuda":
            with torch.cuda.device(index):
                compiled = torch.cuda._compile_kernel(text, name, nvcc_options=["--use_fast_math", "-std=c++17"])
            return _DriverKernel(compiled, index)
        cuda_harness = _checkout.load_harness("cuda_harness")  # test-only, at the repository root
        if cuda_harness is None:
            _failed[device.type] = "no CUDA C++ runtime for CPU tensors (cuda_harness: a source checkout only)"
            return None
        reason = cuda_harness.unavailable_reason()
        if reason is not None:
            _failed[device.type] = f"cuda_harness: {reason}"
            return None
        return getattr(cuda_harness.compile_source(text, name=_source.file_for(name)), name)
    except Exception as exc:  # NVRTC missing, or the shipped source rejected: the Triton kernels serve
        message = str(exc).strip().splitlines()
        _failed[device.type] = f"compiling {_source.file_for(name)} failed: {message[0] if message else exc!r}"
        warnings.warn(f"causal_conv1d_mps: the CUDA C++ kernels are off for this process, the Triton kernels "
                      f"serve instead ({_failed[device.type]})", RuntimeWarning, stacklevel=4)
        return None


class _DriverKernel:
    """A kernel compiled by `torch.cuda._compile_kernel`, launched through `cuLaunchKernel` on the current
    stream. The argument values are packed into one buffer per argument layout (`struct.pack_into`: tensors as
    pointers, ints as 32-bit `int`) that a fixed `kernelParams` array points into: no ctypes object is made
    per argument or per launch, which keeps the host time low."""

    def __init__(self, compiled, device_index: int):
        global _libcuda
        if _libcuda is None:
            try:
                lib = torch.cuda._utils._get_gpu_runtime_library()
            except AttributeError:  # older torch: the driver library by name
                lib = ctypes.CDLL("libcuda.so.1")
            lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            _libcuda = lib
        self._compiled = compiled  # keeps the module loaded
        self._func = compiled.func.value
        self._device = device_index
        self._layouts: dict[tuple, _ArgumentLayout] = {}

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        if torch.cuda.current_device() != self._device:  # the module lives in its device's context
            with torch.cuda.device(self._device):
                return self(grid, block, args, shared_mem)
        kinds = tuple(type(a) is int for a in args)
        layout = self._layouts.get(kinds)
        if layout is None:
            layout = self._layouts[kinds] = _ArgumentLayout(kinds)
        values = [a if type(a) is int else a.data_ptr() for a in args]
        stream = torch._C._cuda_getCurrentRawStream(self._device)
        for attempt in range(2):
            with layout.lock:  # the driver copies the parameters during the call: the buffer is free after it
                struct.pack_into(layout.fmt, layout.buffer, 0, *values)
                result = _libcuda.cuLaunchKernel(self._func, grid[0], grid[1], grid[2], block[0], block[1],
                                                 block[2], shared_mem, stream, layout.params, None)
            if result != _CUDA_ERROR_INVALID_CONTEXT or attempt:
                break
            # a thread that has not used the driver API yet (autograd's device threads): make the device's
            # primary context (the one PyTorch and the module use) current, then launch again
            _make_primary_context_current(self._device)
        if result != 0:
            raise RuntimeError(f"cuLaunchKernel failed with CUDA error {result}")


class _ArgumentLayout:
    """The C layout of one argument list (tensors: pointers, ints: 32-bit `int`, native alignment), with a
    buffer the values are packed into and the `kernelParams` array pointing at each value in it."""

    def __init__(self, kinds: tuple[bool, ...]):
        codes = ["i" if is_int else "P" for is_int in kinds]
        self.fmt = "@" + "".join(codes)
        offsets = [struct.calcsize("@" + "".join(codes[:i + 1])) - struct.calcsize("@" + codes[i])
                   for i in range(len(codes))]
        self.buffer = ctypes.create_string_buffer(max(struct.calcsize(self.fmt), 1))
        base = ctypes.addressof(self.buffer)
        self.params = (ctypes.c_void_p * len(codes))(*[base + off for off in offsets])
        self.lock = threading.Lock()


_CUDA_ERROR_INVALID_CONTEXT = 201


def _make_primary_context_current(index: int) -> None:
    device, context = ctypes.c_int(), ctypes.c_void_p()
    for call, args in (("cuDeviceGet", (ctypes.byref(device), index)),
                       ("cuDevicePrimaryCtxRetain", (ctypes.byref(context), device)),
                       ("cuCtxSetCurrent", (context,))):
        result = getattr(_libcuda, call)(*args)
        if result != 0:
            raise RuntimeError(f"{call} failed with CUDA error {result}")
