"""The objects compile_library returns, with torch.mps.compile_shader's calling convention."""

from __future__ import annotations

import ctypes
import json
import operator
import pathlib
import struct
from typing import Any, Callable, Sequence

import torch

from . import _dispatch, _guard
from ._compiler import executor_library
from ._guard import GuardedStorages
from ._source import ENTRY_PREAMBLE, Kernel, entry

# Element type codes of the shim's mh::TypeCode, and what each torch dtype is.
ANY, FLOAT, HALF, BFLOAT, BOOL, INT8, INT16, INT32, INT64 = 0, 1, 2, 3, 4, 10, 11, 12, 13
CODE_NAMES = {ANY: "any", FLOAT: "float", HALF: "half", BFLOAT: "bfloat", BOOL: "bool", INT8: "8-bit integer",
              INT16: "16-bit integer", INT32: "32-bit integer", INT64: "64-bit integer"}
DTYPE_CODES = {torch.float32: FLOAT, torch.float16: HALF, torch.bfloat16: BFLOAT, torch.bool: BOOL,
               torch.int8: INT8, torch.uint8: INT8, torch.int16: INT16, torch.int32: INT32, torch.int64: INT64}
for _name in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = {"uint16": INT16, "uint32": INT32, "uint64": INT64}[_name]

# arg_casts of compile_shader: how a Python scalar (or list of them) is packed.
CASTS = {"fp16": ("e", HALF), "bf16": (None, BFLOAT), "int32": ("i", INT32), "int16": ("h", INT16),
         "int8": ("b", INT8), "uint8": ("B", INT8)}

def _bfloat16_bits(values: Sequence[float]) -> bytes:
    t = torch.tensor(list(values), dtype=torch.float32).to(torch.bfloat16)
    return t.view(torch.int16).numpy().tobytes()


class KernelFunction:
    """One kernel: call it like a function of torch.mps.compile_shader's library.

    Its machine code is built on first use (one shared library per kernel, cached on disk), so a
    file with hundreds of instantiations costs only what the tests run.
    """

    def __init__(self, library: "Library", index: int, kernel: Kernel):
        self._library = library
        self._index = index
        self._kernel = kernel
        self._dll: ctypes.CDLL | None = None       # this kernel's library (kept loaded)
        self._executor: ctypes.CDLL | None = None  # the shared executor it dispatches through
        self._entry: int | None = None
        self._codes: list[int] = []
        self._max_threads = 0
        self.thread_execution_width = 32

    def _load(self) -> ctypes.CDLL:
        """The executor library, after loading this kernel's own library on first use."""
        if self._dll is None:
            executor = executor_library()  # first: the kernel library resolves its symbols against it
            dll = ctypes.CDLL(str(self._library._build(self._index)))
            i = self._index
            self._entry = ctypes.cast(getattr(dll, f"mh_entry_{i}"), ctypes.c_void_p).value
            self._codes = list((ctypes.c_int * max(len(self._kernel.buffers), 1)).in_dll(dll, f"mh_codes_{i}"))
            self._max_threads = ctypes.c_long.in_dll(dll, f"mh_max_threads_{i}").value
            self._dll = dll
            self._executor = executor
        return self._executor

    @property
    def max_threads_per_threadgroup(self) -> int:
        """1024, or N from the kernel's [[max_total_threads_per_threadgroup(N)]]."""
        self._load()
        return self._max_threads

    @property
    def name(self) -> str:
        return self._kernel.host_name

    def __repr__(self) -> str:
        params = ", ".join(p.declaration for p in self._kernel.params)
        return f"<metal_harness kernel {self.name}({params})>"

    # ------------------------------------------------------------ argument binding
    def _describe(self, i: int) -> str:
        param = self._kernel.buffers[i]
        return f"kernel {self.name!r}, argument {i} ({param.declaration} [[buffer({i})]])"

    def _check_code(self, i: int, given: int, what: str) -> None:
        declared = self._codes[i]
        if declared == ANY or declared == given:
            return
        raise TypeError(f"{self._describe(i)}: the kernel reads {CODE_NAMES[declared]} elements but receives "
                        f"{what}")

    def _pack_scalars(self, i: int, values: Sequence[Any], cast: str | None) -> bytes:
        is_float = isinstance(values[0], float)
        if any(isinstance(v, float) != is_float or isinstance(v, torch.Tensor) for v in values):
            raise TypeError(f"{self._describe(i)}: a list argument must hold only ints or only floats")
        if cast is not None:
            if cast not in CASTS:
                raise ValueError(f"{self._describe(i)}: arg_casts value {cast!r} is not one of {sorted(CASTS)}")
            fmt, code = CASTS[cast]
            self._check_code(i, code, f"a value cast to {cast}")
            return _bfloat16_bits(values) if fmt is None else struct.pack(f"<{len(values)}{fmt}", *values)
        if is_float:
            self._check_code(i, FLOAT, "a Python float (passed as a 32-bit float)")
            return struct.pack(f"<{len(values)}f", *values)
        self._check_code(i, INT64, "a Python int (passed as a 64-bit integer; declare `constant long&`, "
                         "or pass arg_casts={%d: 'int32'})" % i)
        return struct.pack(f"<{len(values)}q", *values)

    def _bind(self, args: tuple, casts: dict[int, str], keep: list, constants: dict[int, ctypes.Array]
              ) -> ctypes.Array:
        """Checks the arguments; returns the slot array with list-of-tensor pointers filled in, and puts
        the packed Python scalars and lists into `constants` (tensors and constants are bound later)."""
        n = len(self._kernel.buffers)
        if len(args) != n:
            declared = ", ".join(p.declaration for p in self._kernel.buffers)
            raise TypeError(f"kernel {self.name!r} takes {n} buffer arguments ({declared}), {len(args)} were given")
        slots = (ctypes.c_void_p * max(n, 1))()
        for i, arg in enumerate(args):
            if isinstance(arg, torch.Tensor):
                if arg.device.type != "cpu":
                    raise ValueError(f"{self._describe(i)}: the harness runs on CPU tensors, got one on {arg.device}")
                if arg.numel() == 0:
                    raise ValueError(f"{self._describe(i)}: an empty tensor has no buffer to bind (nil on MPS): "
                                     "bind a one-element stand-in instead")
                if arg.dtype not in DTYPE_CODES:
                    raise TypeError(f"{self._describe(i)}: Metal has no {arg.dtype}")
                self._check_code(i, DTYPE_CODES[arg.dtype], f"a {arg.dtype} tensor")
                continue  # its pointer is filled in by the caller (guarded copy or own memory)
            if isinstance(arg, (list, tuple)):
                if not arg:
                    raise ValueError(f"{self._describe(i)}: an empty list/tuple cannot be a kernel argument")
                if isinstance(arg[0], torch.Tensor):
                    pointers = (ctypes.c_void_p * len(arg))(*(t.data_ptr() for t in arg))
                    keep.append(pointers)
                    slots[i] = ctypes.addressof(pointers)
                    continue
                data = self._pack_scalars(i, arg, casts.get(i))
            elif isinstance(arg, (int, float)):
                data = self._pack_scalars(i, [arg], casts.get(i))
            else:
                raise TypeError(f"{self._describe(i)}: unsupported argument type {type(arg).__name__}")
            constants[i] = ctypes.create_string_buffer(data, len(data))
        return slots

    # ------------------------------------------------------------ dispatch
    @staticmethod
    def _dims(value: Any, what: str) -> list[int]:
        try:
            dims = [operator.index(value)] if not isinstance(value, (list, tuple, torch.Size)) else \
                [operator.index(d) for d in value]
        except TypeError:
            raise ValueError(f"{what} must be an int or a sequence of 1 to 3 ints, got {value!r}") from None
        if not 1 <= len(dims) <= 3:
            raise ValueError(f"{what} must be an int or a sequence of 1 to 3 ints, got {value!r}")
        if any(d <= 0 or d >= 2**32 for d in dims):
            raise ValueError(f"{what} must be positive and below 2**32 in every dimension, got {value!r}")
        return dims

    def __call__(self, *args: Any, threads: Any = None, group_size: Any = None, arg_casts: Any = None,
                 error_buf_idx: Any = None) -> None:
        if error_buf_idx is not None:
            raise NotImplementedError("error_buf_idx is not supported by the harness")
        casts: dict[int, str] = {}
        if isinstance(arg_casts, str):
            casts = {i: arg_casts for i in range(len(args)) if not isinstance(args[i], torch.Tensor)}
        elif isinstance(arg_casts, dict):
            casts = dict(arg_casts)
        elif arg_casts is not None:
            raise TypeError(f"arg_casts must be a str or a dict, got {type(arg_casts).__name__}")
        if threads is None:  # as compile_shader: the first tensor argument's numel
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first is None:
                raise ValueError(f"kernel {self.name!r}: pass threads= (no tensor argument to take it from)")
            threads = first.numel()
        grid = self._dims(threads, "threads")
        if group_size is None:
            group = [min(grid[0], self.max_threads_per_threadgroup)] if len(grid) == 1 else \
                    [self.max_threads_per_threadgroup] + [1] * (len(grid) - 1)
        else:
            group = self._dims(group_size, "group_size")
            if len(group) != len(grid):
                raise ValueError(f"threads {threads!r} and group_size {group_size!r} must have the same number "
                                 "of dimensions")
        total = 1
        for g in group:
            total *= g
        if total > self.max_threads_per_threadgroup:
            raise ValueError(f"kernel {self.name!r}: threadgroup size {group_size!r} ({total} threads) exceeds "
                             f"max_threads_per_threadgroup = {self.max_threads_per_threadgroup}")
        grid += [1] * (3 - len(grid))
        group += [1] * (3 - len(group))
        dll = self._load()
        keep: list = []
        constants: dict[int, ctypes.Array] = {}
        slots = self._bind(args, casts, keep, constants)
        tensors = {i: a for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.numel() > 0}
        names = [f"argument {i} ({p.declaration})" for i, p in enumerate(self._kernel.buffers)]

        def bind(guard: GuardedStorages) -> ctypes.Array:
            for i in (*tensors, *constants):
                slots[i] = guard.pointer(i)
            return slots

        _dispatch.launch(dll, self._entry, label=f"kernel {self.name!r}", tensors=tensors, constants=constants,
                         names=names, bind=bind, grid=grid, group=group, schedule_var="METAL_HARNESS_SCHEDULE",
                         guard_enabled=_guard.enabled(), barrier_hint=(
                             "threadgroup", "a threadgroup_barrier is missing, or threads race on memory"))


class Library:
    """What compile_library returns: one attribute per kernel host name."""

    def __init__(self, key: str, translated: str, kernels: list[Kernel],
                 build: Callable[[str, str], pathlib.Path]):
        self._key = key
        self._translated = translated
        self._build_library = build
        self._functions = {k.host_name: KernelFunction(self, i, k) for i, k in enumerate(kernels)}

    def _build(self, index: int) -> pathlib.Path:
        kernel = list(self._functions.values())[index]._kernel
        cpp = self._translated + ENTRY_PREAMBLE + entry(index, kernel)
        return self._build_library(cpp, f"{self._key}-{index}")

    def __getattr__(self, name: str) -> KernelFunction:
        functions = self.__dict__.get("_functions", {})
        if name in functions:
            return functions[name]
        raise AttributeError(f"no kernel named {name!r} in this library (kernels: {sorted(functions)})")

    def __dir__(self) -> list[str]:
        return sorted(self._functions)


def kernels_to_json(kernels: list[Kernel]) -> str:
    return json.dumps([{"host_name": k.host_name, "cpp_name": k.cpp_name, "max_threads_expr": k.max_threads_expr,
                        "params": [vars(p) for p in k.params]} for k in kernels])
