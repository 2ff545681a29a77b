"""Run the package's Metal compute kernels on the CPU, on Linux, for tests.

The API mirrors ``torch.mps.compile_shader``::

    lib = metal_harness.compile_library(source)
    lib.kernel_name(*args, threads=..., group_size=...)   # synchronous, CPU tensors

Each kernel is compiled as C++ against a shim ``<metal_stdlib>`` and every GPU thread runs as a
fiber, so threadgroup memory, barriers and SIMD collectives behave as on an Apple GPU. See
docs/METAL_HARNESS.md for what this proves and what it cannot.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import threading

from . import _compiler, _source
from ._library import KernelFunction, Library, kernels_to_json
from ._source import Kernel, MetalSourceError, Param
from .address_spaces import check_address_spaces

__all__ = ["compile_library", "check_address_spaces", "unavailable_reason", "Library", "KernelFunction",
           "MetalSourceError"]

_FILENAME = "kernels.metal"
_libraries: dict[str, Library] = {}
_lock = threading.Lock()


def unavailable_reason() -> str | None:
    """None when a usable compiler was found; otherwise why the harness cannot run."""
    try:
        _compiler.find_compiler()
    except _compiler.CompilerNotFound as e:
        return str(e)
    return None


def _kernels_from_json(text: str) -> list[Kernel]:
    return [Kernel(k["host_name"], k["cpp_name"], tuple(Param(**p) for p in k["params"]), k["max_threads_expr"])
            for k in json.loads(text)]


def _translate(source: str) -> tuple[str, list[Kernel]]:
    _source.check_raw_source(source, _FILENAME)
    without_includes = _source.strip_metal_includes(source, _FILENAME)
    expanded = _compiler.preprocess(without_includes, _FILENAME)
    return _source.translate(expanded, _FILENAME)


def _write_atomically(path: pathlib.Path, text: str) -> None:
    """Other processes (pytest-xdist workers) may read the cache at the same time."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _build(cpp: str, key: str):
    try:
        return _compiler.build_shared_library(cpp, key)
    except SyntaxError as e:
        raise MetalSourceError(str(e)) from None


def compile_library(source: str) -> Library:
    """Compiles Metal source into a library of kernels runnable on CPU tensors.

    The whole file is checked at once (every kernel instantiated, as Apple's compiler does);
    each kernel's machine code is built on its first call. Both are cached in this process and
    on disk (METAL_HARNESS_CACHE, default ~/.cache/ccmps-metal-harness). Raises
    MetalSourceError, a SyntaxError as compile_shader raises, for source that Metal would reject
    and for the compiler's errors.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    key = hashlib.sha256((_compiler.harness_fingerprint() + "\0" + source).encode()).hexdigest()[:32]
    with _lock:
        if key in _libraries:
            return _libraries[key]
        cache = _compiler.cache_dir()
        translated_path, meta_path = cache / f"{key}.cpp", cache / f"{key}.json"
        if translated_path.exists() and meta_path.exists():
            translated, kernels = translated_path.read_text(), _kernels_from_json(meta_path.read_text())
        else:
            translated, kernels = _translate(source)
            entries = "".join(_source.entry(i, k) for i, k in enumerate(kernels))
            try:
                _compiler.check_syntax(translated + _source.ENTRY_PREAMBLE + entries)
            except SyntaxError as e:
                raise MetalSourceError(str(e)) from None
            _write_atomically(meta_path, kernels_to_json(kernels))
            _write_atomically(translated_path, translated)  # written last: marks the check as passed
        library = Library(key, translated, kernels, _build)
        _libraries[key] = library
        return library
