"""Compile the CUDA C++ kernels at first use and launch them.

On a CUDA device the source goes through NVRTC, which PyTorch's CUDA wheels carry, by way of
`torch.cuda._compile_kernel` (compile to PTX, load the module); the launch calls the driver's
`cuLaunchKernel` on the current stream, so CUDA-graph capture records it like any PyTorch kernel. Each
variant (the contract's defines) compiles once per process and device (about 0.1-0.3 s).

On CPU tensors the same source runs through `cuda_harness` (the repository's test-only CPU harness, not
installed with the package): that is how CI checks these kernels without a GPU.

Both kinds of kernel can be called with any argument list (`kernel(grid, block, args)`), or prepared once
per call signature (`kernel.prepare(grid, block, pointers, ints)`): the launchers' plans hold prepared
launches, whose call passes only the pointers (docs/CUDA_KERNELS.md, "Launch plans").

Nothing here raises for a missing compiler: `kernel()` returns None with the reason kept in
`unavailable_reason()`, and the launchers then use the Triton kernels. A compile error of the shipped
source is a bug of this package: it warns once, quoting the compiler, and the Triton kernels serve.
"""
from __future__ import annotations

import ctypes
import functools
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
_libcuda = None  # the driver library (ctypes.CDLL, `cuLaunchKernel` with argtypes: the general call)
_launch_kernel = None  # the driver's `cuLaunchKernel` for prepared launches (see `_PreparedLaunch`)
# read per launch; benchmarks/cuda_launch_overhead.py stands them in on a machine without a GPU
_current_device = getattr(torch._C, "_cuda_getDevice", None)
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)

ENV_VAR = "CAUSAL_CONV1D_CUDA_KERNELS"
# os.environ.get encodes the key and decodes the value (about 0.7 us, a miss raises KeyError inside); on
# POSIX its byte mapping gives the same answer, still read at call time, for a twentieth of that
_ENV_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_KEY = ENV_VAR.encode()


def enabled() -> bool:
    """`CAUSAL_CONV1D_CUDA_KERNELS=0` turns the CUDA C++ kernels off (the Triton kernels serve every call)."""
    if _ENV_BYTES is not None:
        return _ENV_BYTES.get(_ENV_KEY) != b"0"
    return os.environ.get(ENV_VAR, "1") != "0"


def available(device_type: str) -> bool:
    """`unavailable_reason(device) is None` for a device of `device_type` ("cuda" or "cpu") where a kernel
    was compiled before, cheaply enough for every launch: not turned off, and no compile has failed."""
    if _ENV_BYTES is not None:
        return _ENV_BYTES.get(_ENV_KEY) != b"0" and device_type not in _failed
    return enabled() and device_type not in _failed


def launch_device(x: torch.Tensor, allow_cpu: bool) -> int | None:
    """The device index the launchers' plans are keyed by: x's CUDA device, -1 for CPU tensors through
    `cuda_harness` (tests pass `allow_cpu`), or None where the kernels cannot run the call (another device,
    turned off, a failed compile)."""
    if x.is_cuda:
        return x.get_device() if available("cuda") else None
    if allow_cpu and x.is_cpu and available("cpu"):
        return -1
    return None


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
                # The first call of a kernel may come from autograd's device thread (a backward), which has no
                # current driver context: loading the module would fail with "invalid device context" and
                # turn the kernels off for the process. The device's primary context is PyTorch's own.
                _load_driver()
                _make_primary_context_current(index)
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
        return _HarnessKernel(getattr(cuda_harness.compile_source(text, name=_source.file_for(name)), name))
    except Exception as exc:  # NVRTC missing, or the shipped source rejected: the Triton kernels serve
        message = str(exc).strip().splitlines()
        _failed[device.type] = f"compiling {_source.file_for(name)} failed: {message[0] if message else exc!r}"
        warnings.warn(f"causal_conv1d_mps: the CUDA C++ kernels are off for this process, the Triton kernels "
                      f"serve instead ({_failed[device.type]})", RuntimeWarning, stacklevel=4)
        return None


class _DriverKernel:
    """A kernel compiled by `torch.cuda._compile_kernel`, launched through `cuLaunchKernel` on the current
    stream.

    `prepare` (what the launchers use) fixes the grid, block and integer arguments once per call signature;
    calling `kernel(grid, block, args)` takes any argument list (tensors as pointers, ints as 32-bit `int`),
    packed into one buffer per argument layout that a fixed `kernelParams` array points into."""

    def __init__(self, compiled, device_index: int):
        _load_driver()
        self._compiled = compiled  # keeps the module loaded
        self._func = compiled.func.value
        self._device = device_index
        self._layouts: dict[tuple, _ArgumentLayout] = {}

    def prepare(self, grid, block, pointers: int, ints) -> _PreparedLaunch:
        """A launch of this kernel with `grid`, `block` and its arguments: `pointers` pointers, then `ints`."""
        return _PreparedLaunch(self, grid, block, pointers, ints)

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        if _current_device() != self._device:  # the module lives in its device's context
            with torch.cuda.device(self._device):
                return self(grid, block, args, shared_mem)
        kinds = tuple(type(a) is int for a in args)
        layout = self._layouts.get(kinds)
        if layout is None:
            layout = self._layouts[kinds] = _ArgumentLayout(kinds)
        values = [a if type(a) is int else a.data_ptr() for a in args]
        stream = _current_stream(self._device)
        for attempt in range(2):
            with layout.lock:  # the driver copies the parameters during the call: the buffer is free after it
                struct.pack_into(layout.fmt, layout.buffer, 0, *values)
                result = _libcuda.cuLaunchKernel(self._func, grid[0], grid[1], grid[2], block[0], block[1],
                                                 block[2], shared_mem, stream, layout.params, None)
            if result != _CUDA_ERROR_INVALID_CONTEXT or attempt:
                break
            _make_primary_context_current(self._device)
        _raise_for(result)


class _PreparedLaunch:
    """One kernel with its grid, block and integer arguments fixed: `launch` takes the pointer arguments'
    values (ints, `Tensor.data_ptr()`) and launches on the device's current stream.

    The integers sit packed once behind the pointers in the argument buffer that the `kernelParams` array
    points into; a call packs the pointers in front of them and calls the driver with an argument tuple
    built once per stream (no ctypes conversion per argument: `cuLaunchKernel` is called without argtypes,
    each value already a ctypes object or a small int). The buffer is shared: a lock spans packing and
    launching (the driver has copied the parameters when the call returns).

    The call gives the GIL up, like any ctypes.CDLL call: keeping it saves about 0.05 us, but a launch blocks
    when the device's launch queue is full, and a stream callback that runs Python (cupy, numba) would then
    wait for the GIL this thread holds while the queue waits for the callback."""

    __slots__ = ("_kernel", "_device", "_head", "_params", "_buffer", "_pack", "_calls", "_lock")
    takes_pointers = True

    def __init__(self, kernel: _DriverKernel, grid, block, pointers: int, ints):
        codes = "P" * pointers + "i" * len(ints)
        offsets = [struct.calcsize("@" + codes[:i + 1]) - struct.calcsize("@" + codes[i]) for i in range(len(codes))]
        self._buffer = ctypes.create_string_buffer(max(struct.calcsize("@" + codes), 1))
        struct.pack_into("@" + codes, self._buffer, 0, *[0] * pointers, *ints)
        self._pack = functools.partial(struct.Struct("@" + "P" * pointers).pack_into, self._buffer, 0)
        base = ctypes.addressof(self._buffer)
        self._params = (ctypes.c_void_p * max(len(codes), 1))(*[base + off for off in offsets])
        # cuLaunchKernel(f, gridDim x y z, blockDim x y z, sharedMemBytes, hStream, kernelParams, extra)
        self._head = (ctypes.c_void_p(kernel._func), *map(int, grid), *map(int, block), 0)
        self._kernel = kernel  # keeps the module loaded while a plan holds this launch
        self._device = kernel._device
        self._calls: dict[int, tuple] = {}  # stream -> the call's arguments
        self._lock = threading.Lock()

    def _arguments(self, stream: int) -> tuple:
        if len(self._calls) >= 16:  # streams are few; bound the table all the same
            self._calls.clear()
        args = self._calls[stream] = (*self._head, ctypes.c_void_p(stream), self._params, None)
        return args

    def launch(self, *pointers: int) -> None:
        """Launch with these pointer arguments (a method, not `__call__`: calling an instance costs more)."""
        device = self._device
        if _current_device() != device:  # the module lives in its device's context
            with torch.cuda.device(device):
                return self.launch(*pointers)
        stream = _current_stream(device)
        args = self._calls.get(stream)
        if args is None:
            args = self._arguments(stream)
        lock = self._lock
        lock.acquire()  # (`with lock` costs twice as much)
        try:
            self._pack(*pointers)
            result = _launch_kernel(*args)
        finally:
            lock.release()
        if result:
            self._retry(result, pointers, args)

    def _retry(self, result: int, pointers, args) -> None:
        if result == _CUDA_ERROR_INVALID_CONTEXT:
            _make_primary_context_current(self._device)
            with self._lock:
                self._pack(*pointers)
                result = _launch_kernel(*args)
        _raise_for(result)


class _HarnessKernel:
    """A kernel of `cuda_harness` (CPU tensors, tests only) behind the interface of `_DriverKernel`."""

    def __init__(self, function):
        self._function = function

    def prepare(self, grid, block, pointers: int, ints) -> _HarnessLaunch:
        return _HarnessLaunch(self._function, grid, block, pointers, ints)

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        self._function(grid=grid, block=block, args=args, shared_mem=shared_mem)


class _HarnessLaunch:
    """`_PreparedLaunch` for `cuda_harness`, except that `launch` takes the tensors themselves, not their
    pointers (the harness checks each tensor and guards its memory)."""

    takes_pointers = False

    def __init__(self, function, grid, block, pointers: int, ints):
        self._function, self._grid, self._block = function, tuple(grid), tuple(block)
        self._pointers, self._ints = pointers, list(ints)

    def launch(self, *tensors) -> None:
        if len(tensors) != self._pointers:
            raise TypeError(f"expected {self._pointers} tensors, got {len(tensors)}")
        self._function(grid=self._grid, block=self._block, args=[*tensors, *self._ints])


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


def _load_driver() -> None:
    """The driver library, once: `_libcuda` for the general call and the context calls, `_launch_kernel`
    (the same `cuLaunchKernel`, called without argtypes) for prepared launches."""
    global _libcuda, _launch_kernel
    if _libcuda is None:
        try:
            lib = torch.cuda._utils._get_gpu_runtime_library()
        except AttributeError:  # older torch: the driver library by name
            lib = ctypes.CDLL("libcuda.so.1")
        lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        _libcuda = lib
    if _launch_kernel is None:
        address = ctypes.cast(_libcuda.cuLaunchKernel, ctypes.c_void_p).value
        _launch_kernel = ctypes.CFUNCTYPE(ctypes.c_int)(address)


def _raise_for(result: int) -> None:
    if result != 0:
        raise RuntimeError(f"cuLaunchKernel failed with CUDA error {result}")


def _make_primary_context_current(index: int) -> None:
    """A thread that has not used the driver API yet (autograd's device threads) has no current context
    (CUDA error 201): make the device's primary context (the one PyTorch and the module use) current."""
    device, context = ctypes.c_int(), ctypes.c_void_p()
    for call, args in (("cuDeviceGet", (ctypes.byref(device), index)),
                       ("cuDevicePrimaryCtxRetain", (ctypes.byref(context), device)),
                       ("cuCtxSetCurrent", (context,))):
        result = getattr(_libcuda, call)(*args)
        if result != 0:
            raise RuntimeError(f"{call} failed with CUDA error {result}")
