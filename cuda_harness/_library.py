"""The objects compile_source returns, with the calling convention of torch.cuda._compile_kernel's
kernels: `kernel(grid=(gx, gy, gz), block=(bx, by, bz), args=[...], shared_mem=0)`."""

from __future__ import annotations

import ctypes
import hashlib
import operator
import re
import pathlib
import struct
from typing import Any, Callable

import torch

from metal_harness import _dispatch, _guard
from metal_harness._compiler import executor_library

from ._source import ENTRY_PREAMBLE, Kernel, entry

POINTER, SIGNED, UNSIGNED, FLOATING, BOOL, OTHER = range(6)  # ch::ParamKind
INTEGER_FORMATS = {1: "b", 2: "h", 4: "i", 8: "q"}

# CUDA's limits (sm_90): threads per block and per axis, blocks per axis, shared memory per block.
MAX_BLOCK = (1024, 1024, 64)
MAX_GRID = (2**31 - 1, 65535, 65535)
DEFAULT_SHARED = 48 * 1024
MAX_SHARED = 227 * 1024


class ParamInfo(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("size", ctypes.c_int), ("align", ctypes.c_int)]


def guard_enabled() -> bool:
    return _guard.enabled("CUDA_HARNESS_GUARD")


class KernelFunction:
    """One kernel, called like torch.cuda._compile_kernel's: synchronously, on CPU tensors.

    Its machine code is built on first use (one shared library per kernel, cached on disk).
    `torch_launcher`: refuse the scalar parameters that torch's launcher would pass wrongly (it
    passes every Python int as a 4-byte C int and every float as a C double).
    """

    def __init__(self, library: "Library", index: str, kernel: Kernel, torch_launcher: bool = False):
        self._torch_launcher = torch_launcher
        self._library = library
        self._index = index
        self._kernel = kernel
        self._dll: ctypes.CDLL | None = None
        self._executor: ctypes.CDLL | None = None
        self._entry: int | None = None
        self._params: list[ParamInfo] = []
        self._max_threads = 0
        self._max_shared_mem_bytes = 0

    def _load(self) -> ctypes.CDLL:
        if self._dll is None:
            executor = executor_library()  # first: the kernel library resolves its symbols against it
            dll = ctypes.CDLL(str(self._library._build(self._index)))
            i, n = self._index, len(self._kernel.declarations)
            self._entry = ctypes.cast(getattr(dll, f"ch_entry_{i}"), ctypes.c_void_p).value
            self._params = list((ParamInfo * max(n, 1)).in_dll(dll, f"ch_params_{i}"))[:n]
            self._max_threads = ctypes.c_long.in_dll(dll, f"ch_max_threads_{i}").value
            self._dll = dll
            self._executor = executor
        return self._executor

    @property
    def name(self) -> str:
        return self._kernel.name

    @property
    def max_threads_per_block(self) -> int:
        """1024, or the first argument of the kernel's __launch_bounds__."""
        self._load()
        return self._max_threads

    def __repr__(self) -> str:
        return f"<cuda_harness kernel {self.name}({', '.join(self._kernel.declarations)})>"

    def set_shared_memory_config(self, shared_mem_bytes: int) -> None:
        """As torch's: allows launches with `shared_mem` up to this many bytes of dynamic shared memory."""
        if shared_mem_bytes > MAX_SHARED:
            raise RuntimeError(f"kernel {self.name!r}: requested shared memory ({shared_mem_bytes} bytes) exceeds "
                               f"the device's maximum ({MAX_SHARED} bytes, sm_90)")
        self._max_shared_mem_bytes = shared_mem_bytes

    # ------------------------------------------------------------ argument binding
    def _describe(self, i: int) -> str:
        return f"kernel {self.name!r}, argument {i} ({self._kernel.declarations[i]})"

    def for_torch_launcher(self) -> "KernelFunction":
        """This kernel, with the argument rules of torch.cuda._compile_kernel's launcher."""
        return KernelFunction(self._library, self._index, self._kernel, torch_launcher=True)

    def _pack_scalar(self, i: int, value: Any, info: ParamInfo) -> bytes:
        if self._torch_launcher and info.kind in (SIGNED, UNSIGNED) and info.size > 4:
            raise TypeError(f"{self._describe(i)}: torch.cuda._compile_kernel passes a Python int as a 4-byte C int, "
                            f"which this {info.size}-byte parameter would misread on the GPU: declare it int")
        if self._torch_launcher and info.kind == FLOATING and info.size != 8:
            raise TypeError(f"{self._describe(i)}: torch.cuda._compile_kernel passes a Python float as a C double, "
                            "which this float parameter would misread on the GPU: declare it double")
        if info.kind in (SIGNED, UNSIGNED, BOOL):
            if not isinstance(value, int):
                raise TypeError(f"{self._describe(i)}: expected a Python int for this integer parameter, got "
                                f"{type(value).__name__} {value!r}")
            if info.kind == BOOL:
                if value not in (0, 1):
                    raise ValueError(f"{self._describe(i)}: expected 0, 1 or a bool, got {value!r}")
                return struct.pack("<?", bool(value))
            bits = 8 * info.size
            low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if info.kind == SIGNED else (0, (1 << bits) - 1)
            if not low <= value <= high:
                raise OverflowError(f"{self._describe(i)}: {value} does not fit the parameter's "
                                    f"{'signed' if info.kind == SIGNED else 'unsigned'} {bits}-bit type "
                                    f"[{low}, {high}]")
            fmt = INTEGER_FORMATS[info.size]
            return struct.pack("<" + (fmt if info.kind == SIGNED else fmt.upper()), value)
        if info.kind == FLOATING:
            if not isinstance(value, float):
                raise TypeError(f"{self._describe(i)}: expected a Python float for this floating-point parameter "
                                f"(torch passes a Python int as a C int), got {type(value).__name__} {value!r}")
            if info.size not in (4, 8):
                raise TypeError(f"{self._describe(i)}: the harness passes floats as float or double only")
            return struct.pack("<f" if info.size == 4 else "<d", value)
        raise TypeError(f"{self._describe(i)}: the harness cannot pass a Python value to a parameter of this "
                        "type (pointers, integers, bool, float and double are supported)")

    def _check_tensor(self, i: int, t: torch.Tensor, info: ParamInfo) -> None:
        if info.kind != POINTER:
            raise TypeError(f"{self._describe(i)}: a tensor was given for a parameter that is not a pointer")
        if t.device.type != "cpu":
            raise ValueError(f"{self._describe(i)}: the harness runs on CPU tensors, got one on {t.device}")
        if t.numel() == 0:
            raise ValueError(f"{self._describe(i)}: an empty tensor has no memory to bind: bind a one-element "
                             "stand-in instead")
        if t.data_ptr() % info.align:
            raise ValueError(f"{self._describe(i)}: the tensor's address is {t.data_ptr() % info.align} bytes past "
                             f"a multiple of {info.align}, the alignment of the pointed-to type (a misaligned "
                             "address error on the GPU)")

    @staticmethod
    def _dims(value: Any, what: str, limits: tuple[int, int, int]) -> list[int]:
        try:
            dims = [operator.index(d) for d in value]
        except TypeError:
            raise ValueError(f"{what} must be a tuple of 3 ints, got {value!r}") from None
        if len(dims) != 3:
            raise ValueError(f"{what} must be a tuple of 3 ints, got {value!r}")
        if any(not 1 <= d <= limit for d, limit in zip(dims, limits)):
            raise ValueError(f"{what} {tuple(dims)} is outside CUDA's limits: each dimension from 1 to "
                             f"{limits}")
        return dims

    def __call__(self, grid: Any = (1, 1, 1), block: Any = (1, 1, 1), args: list | None = None,
                 shared_mem: int = 0, stream: Any = None) -> None:
        executor = self._load()
        grid_dims = self._dims(grid, "grid", MAX_GRID)
        block_dims = self._dims(block, "block", MAX_BLOCK)
        threads = block_dims[0] * block_dims[1] * block_dims[2]
        if threads > min(self._max_threads, 1024):
            raise ValueError(f"kernel {self.name!r}: block {tuple(block_dims)} has {threads} threads, more than "
                             f"{min(self._max_threads, 1024)} (its __launch_bounds__ or CUDA's limit)")
        if shared_mem < 0:
            raise ValueError(f"shared_mem must be >= 0, got {shared_mem}")
        if shared_mem >= DEFAULT_SHARED and shared_mem > self._max_shared_mem_bytes:
            configured = self._max_shared_mem_bytes
            raise RuntimeError(f"Kernel requires {shared_mem} bytes of shared memory (>= 48KB), but "
                               f"{f'only {configured} bytes configured' if configured else 'not configured'}. "
                               "Call kernel.set_shared_memory_config(shared_mem) after compilation and before "
                               "launching the kernel.")
        args = list(args or [])
        n = len(self._params)
        if len(args) != n:
            raise TypeError(f"kernel {self.name!r} takes {n} arguments ({', '.join(self._kernel.declarations)}), "
                            f"{len(args)} were given")
        values = (ctypes.c_void_p * max(n, 1))()  # tensors' pointers (kernelParams point at them)
        scalars: dict[int, ctypes.Array] = {}
        tensors: dict[int, torch.Tensor] = {}
        for i, (arg, info) in enumerate(zip(args, self._params)):
            if isinstance(arg, torch.Tensor):
                self._check_tensor(i, arg, info)
                tensors[i] = arg
            elif isinstance(arg, (int, float)):
                if info.kind == POINTER:
                    raise TypeError(f"{self._describe(i)}: expected a tensor for this pointer parameter, got "
                                    f"{type(arg).__name__} {arg!r}")
                data = self._pack_scalar(i, arg, info)
                scalars[i] = ctypes.create_string_buffer(data, len(data))
            else:
                raise TypeError(f"{self._describe(i)}: unsupported argument type {type(arg).__name__}")
        names = [f"argument {i} ({d})" for i, d in enumerate(self._kernel.declarations)]

        def bind(guard: _guard.GuardedStorages) -> ctypes.Array:
            slots = (ctypes.c_void_p * max(n, 1))()
            for i in tensors:
                values[i] = guard.pointer(i)
                slots[i] = ctypes.addressof(values) + i * ctypes.sizeof(ctypes.c_void_p)
            for i, buffer in scalars.items():
                slots[i] = ctypes.addressof(buffer)
            return slots

        # CUDA: static + dynamic within 48 KiB, unless the kernel opted in to more dynamic memory
        # (then up to the device's 227 KiB; dynamic <= the configured size is checked above).
        shared_limit = MAX_SHARED if self._max_shared_mem_bytes > DEFAULT_SHARED else DEFAULT_SHARED
        _dispatch.launch(executor, self._entry, label=f"kernel {self.name!r}", tensors=tensors, constants={},
                         names=names, bind=bind, grid=[g * b for g, b in zip(grid_dims, block_dims)],
                         group=block_dims, schedule_var="CUDA_HARNESS_SCHEDULE", guard_enabled=guard_enabled(),
                         barrier_hint=("block", "a __syncthreads is missing, or threads race on memory"),
                         dialect=_dispatch.CUDA, shared_limit=shared_limit,
                         dynamic_shared=shared_mem)


class Library:
    """What compile_source returns: one attribute per kernel name."""

    def __init__(self, key: str, translated: str, kernels: list[Kernel],
                 build: Callable[[str, str], pathlib.Path]):
        self._key = key
        self._translated = translated
        self._build_library = build
        self._functions = {k.name: KernelFunction(self, str(i), k) for i, k in enumerate(kernels) if not k.template}
        self._templates = {k.name: k for k in kernels if k.template}

    def _build(self, index: str) -> pathlib.Path:
        kernel = next(f._kernel for f in self._functions.values() if f._index == index)
        cpp = self._translated + ENTRY_PREAMBLE + entry(index, kernel)
        return self._build_library(cpp, f"{self._key}-{index}")

    def get_function(self, name: str) -> KernelFunction:
        """The kernel `name`, or the instantiation of a kernel template it names ("f<4>", "g<float, 8>",
        NVRTC's name expressions); an instantiation's code is built, and checked, on its first call."""
        if name in self._functions:
            return self._functions[name]
        m = re.fullmatch(r"\s*(\w+)\s*<(.*)>\s*", name, re.DOTALL)
        if m and m.group(1) in self._templates:
            template = self._templates[m.group(1)]
            index = "t" + hashlib.sha256(name.encode()).hexdigest()[:16]  # the same in every process
            function = KernelFunction(self, index, Kernel(name, template.declarations, template.max_threads_expr))
            self._functions[name] = function
            return function
        templates = f"; kernel templates: {sorted(self._templates)}" if self._templates else ""
        raise AttributeError(f"no kernel named {name!r} in this library (kernels: {sorted(self._functions)}"
                             f"{templates})")

    def __getattr__(self, name: str) -> KernelFunction:
        if name.startswith("__") or "_functions" not in self.__dict__:
            raise AttributeError(name)
        if name in self._templates:
            raise AttributeError(f"kernel {name!r} is a template: get an instantiation with "
                                 f"get_function('{name}<...>')")
        return self.get_function(name)

    def __dir__(self) -> list[str]:
        return sorted(self._functions)

