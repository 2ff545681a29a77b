"""Kernel launches with a short host path for repeated calls.

`kernel[grid](...)` re-binds every argument and recomputes Triton's specialisation key on each call,
which costs more host time than a small convolution costs on the GPU (docs/PERF_NOTES.md, P5). Here
the first call of each specialisation goes through Triton as usual and keeps the compiled kernel; later
calls with the same key call its launcher directly. The key covers everything Triton specialises on:
the constexpr values, `num_warps`, each tensor's dtype and 16-byte alignment, and the integers
themselves (finer than Triton's "equals 1 / multiple of 16 / needs 64 bits", so never wrong).

A call whose integers are new (a new sequence length, say) but of the same class as a compiled call's
(equal to 1, divisible by 16, and the integer width; still finer than Triton's specialisation) finds that
compiled kernel through a second table keyed by those classes, instead of Triton's own path.

The interpreter, ROCm, a Triton whose compiled-kernel interface differs, or
`CAUSAL_CONV1D_TRITON_FAST_LAUNCH=0` take Triton's own path every time.
"""
from __future__ import annotations

import os

import torch

# ROCm's Triton also specialises a tensor on whether it spans less than 2 GB (buffer ops), which the key
# does not hold: there every launch takes Triton's own path
_enabled = os.environ.get("CAUSAL_CONV1D_TRITON_FAST_LAUNCH", "1") != "0" and torch.version.hip is None
_compiled: dict[tuple, tuple] = {}  # exact key -> (launcher, function handle, packed metadata, compiled kernel)
_by_class: dict[tuple, tuple] = {}  # key with integers reduced to `_int_class` -> the same entries
_MAX_ENTRIES = 4096
# cuda launches that took Triton's own path (first use of a key, or a key that keeps changing); counted only
# there, so a cache hit pays nothing for it (examples/transformers_lfm2.py --diagnose reads it)
misses = 0
_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _arg_key(arg):
    """What Triton specialises a runtime argument on (integers: their value, a superset of it)."""
    if type(arg) is int or arg is None:
        return arg
    return arg.dtype, arg.data_ptr() & 15 == 0


def cache_key(kernel, device: int, num_warps: int, constexprs: dict, args: tuple) -> tuple:
    """The key of a compiled kernel in the launch cache (benchmarks/host_overhead.py times it alone).

    The same as `(kernel, device, num_warps, *constexprs.values(), *map(_arg_key, args))`, built without a
    Python call per argument (this runs on every launch)."""
    return (kernel, device, num_warps, *constexprs.values(),
            *[a if type(a) is int or a is None else (a.dtype, a.data_ptr() & 15 == 0) for a in args])


def _int_class(value: int):
    """What Triton specialises an integer argument on, or finer: equal to 1 (a constant), divisible by 16,
    and the width it needs (int32, uint32, int64, uint64)."""
    if value == 1:
        return 1
    if -2**31 <= value < 2**31:
        width = 32
    elif 0 <= value < 2**32:
        width = -32
    elif -2**63 <= value < 2**63:
        width = 64
    else:
        width = -64
    return value % 16 == 0, width


def class_key(kernel, device: int, num_warps: int, constexprs: dict, args: tuple) -> tuple:
    """`cache_key` with each integer argument reduced to `_int_class` (built on an exact-key miss only)."""
    return (kernel, device, num_warps, *constexprs.values(),
            *[_int_class(a) if type(a) is int else a if a is None else (a.dtype, a.data_ptr() & 15 == 0)
              for a in args])


def _remember(table: dict, key: tuple, entry: tuple) -> None:
    if len(table) >= _MAX_ENTRIES:  # keys hold shapes: bound the table for ever-changing shapes
        table.clear()
    table[key] = entry


def launch(kernel, grid, args: tuple, constexprs: dict, num_warps: int) -> None:
    """`kernel[grid](*args, **constexprs, num_warps=num_warps)`, with a cached direct launch.

    `constexprs` must list the kernel's constexpr parameters in signature order, after `args`.
    """
    global _enabled, misses
    first = args[0]
    if _enabled and first.is_cuda:
        device = first.get_device()  # a compiled kernel is loaded per device (an int: no torch.device built)
        key = cache_key(kernel, device, num_warps, constexprs, args)
        entry = _compiled.get(key)
        by_class = None
        if entry is None:  # new integers: the same specialisation may be compiled already
            by_class = class_key(kernel, device, num_warps, constexprs, args)
            entry = _by_class.get(by_class)
            if entry is not None:
                _remember(_compiled, key, entry)
        if entry is not None:
            run, function, metadata, _ = entry
            try:
                run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                    _current_stream(device), function, metadata, None, None, None, *args, *constexprs.values())
                return
            except TypeError:  # launcher signature of another Triton release: use Triton's path from now on
                _enabled = False
        misses += 1
        result = kernel[grid](*args, **constexprs, num_warps=num_warps)
        if _enabled and hasattr(result, "packed_metadata") and hasattr(result, "run"):
            # the launch above initialised the handles: keep what the next call needs, and the compiled kernel
            # itself, whose deletion would unload the module that `function` lives in
            entry = (result.run, result.function, result.packed_metadata, result)
            _remember(_compiled, key, entry)
            _remember(_by_class, by_class or class_key(kernel, device, num_warps, constexprs, args), entry)
        return
    if first.is_cuda:  # the fast path is off (environment, ROCm, another Triton's launcher)
        misses += 1
    kernel[grid](*args, **constexprs, num_warps=num_warps)
