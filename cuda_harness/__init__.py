"""Run CUDA C++ kernels on the CPU, on machines without a GPU, for tests.

The API mirrors ``torch.cuda._compile_kernel``'s kernels (compiled by NVRTC on a GPU machine)::

    lib = cuda_harness.compile_source(source)
    lib.kernel_name(grid=(gx, gy, gz), block=(bx, by, bz), args=[...], shared_mem=0)  # CPU tensors

The source is compiled as C++ against a shim of CUDA's device built-ins (include/cuda_harness.h)
and runs on metal_harness's executor: every GPU thread is a fiber, so shared memory,
__syncthreads and warp shuffles behave as on the GPU. See docs/CUDA_HARNESS.md.
"""

from __future__ import annotations

import json
import os
import pathlib
import threading

from metal_harness import _compiler
from metal_harness import _write_atomically

from . import _source
from ._library import KernelFunction, Library
from ._source import CudaSourceError, Kernel

__all__ = ["compile_source", "compile_kernel", "unavailable_reason", "Library", "KernelFunction", "CudaSourceError"]

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
INCLUDE_DIR = PACKAGE_DIR / "include"
COMPILER_VARS = ("CUDA_HARNESS_CXX", "METAL_HARNESS_CXX")
# What NVRTC defines for an sm_90 target, and a name to tell the harness apart.
DEFINES = ["-D__CUDACC__", "-D__CUDACC_RTC__", "-D__CUDA_ARCH__=900", "-DCUDA_HARNESS=1"]
FLAGS = _compiler.BASE_FLAGS + os.environ.get("CUDA_HARNESS_CXXFLAGS", "").split()

_libraries: dict[str, Library] = {}
_lock = threading.Lock()


def unavailable_reason() -> str | None:
    """None when a usable compiler was found; otherwise why the harness cannot run."""
    try:
        _compiler.find_compiler(COMPILER_VARS)
    except _compiler.CompilerNotFound as e:
        return str(e)
    return None


def _cache() -> pathlib.Path:
    return _compiler.cache_dir("CUDA_HARNESS_CACHE", "ccmps-cuda-harness")


def _toolchain() -> dict:
    return dict(compiler_vars=COMPILER_VARS, cache=_cache(), flags=FLAGS,
                include_dirs=(INCLUDE_DIR, _compiler.INCLUDE_DIR), language="CUDA")


def _fingerprint() -> str:
    """Changes whenever the shim, the pre-pass, the executor or the compiler changes."""
    files = sorted(INCLUDE_DIR.iterdir()) + sorted(PACKAGE_DIR.glob("*.py"))
    _, description = _compiler.find_compiler(COMPILER_VARS)
    return _compiler.fingerprint(_compiler.harness_fingerprint(), description, *FLAGS,
                                 *(f.read_bytes() for f in files))


def _build(cpp: str, key: str) -> pathlib.Path:
    try:
        return _compiler.build_shared_library(cpp, key, **_toolchain())
    except SyntaxError as e:
        raise CudaSourceError(f"Kernel compilation failed:\n{e}") from None


def _translate(source: str, name: str) -> tuple[str, list[Kernel]]:
    try:
        expanded = _compiler.preprocess(source, name, DEFINES, COMPILER_VARS)
    except SyntaxError as e:
        raise CudaSourceError(f"Kernel compilation failed:\n{e}") from None
    return _source.translate(expanded, name)


def compile_source(source: str, name: str = "kernels.cu") -> Library:
    """Compiles CUDA C++ source into a library of its `__global__` kernels, runnable on CPU tensors.

    The whole file is checked at once (as NVRTC compiles it); each kernel's machine code is built
    on its first call. Both are cached in this process and on disk (CUDA_HARNESS_CACHE, default
    ~/.cache/ccmps-cuda-harness). `name` is the file name in error messages. Raises
    CudaSourceError, a RuntimeError as torch.cuda._compile_kernel raises, with the compiler's
    messages (`name:LINE:COLUMN`).
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    key = _compiler.fingerprint(_fingerprint(), name, source)
    with _lock:
        if key in _libraries:
            return _libraries[key]
        translated_path, meta_path = _cache() / f"{key}.cpp", _cache() / f"{key}.json"
        if translated_path.exists() and meta_path.exists():
            translated = translated_path.read_text()
            kernels = [Kernel(k["name"], tuple(k["declarations"]), k["max_threads_expr"], k["template"])
                       for k in json.loads(meta_path.read_text())]
        else:
            translated, kernels = _translate(source, name)
            entries = "".join(_source.entry(str(i), k) for i, k in enumerate(kernels) if not k.template)
            try:
                _compiler.check_syntax(translated + _source.ENTRY_PREAMBLE + entries, **_toolchain())
            except SyntaxError as e:
                raise CudaSourceError(f"Kernel compilation failed:\n{e}") from None
            _write_atomically(meta_path, json.dumps([
                {"name": k.name, "declarations": list(k.declarations), "max_threads_expr": k.max_threads_expr,
                 "template": k.template}
                for k in kernels]))
            _write_atomically(translated_path, translated)  # written last: marks the check as passed
        library = Library(key, translated, kernels, _build)
        _libraries[key] = library
        return library


def compile_kernel(kernel_source: str, kernel_name: str, compute_capability: str | None = None,
                   cuda_include_dirs: list | None = None, nvcc_options: list | None = None) -> KernelFunction:
    """A stand-in for torch.cuda._compile_kernel with its signature: the kernel `kernel_name` of
    `kernel_source`, callable as `kernel(grid=..., block=..., args=[...], shared_mem=0)` on CPU
    tensors. `kernel_name` may name a template's instantiation ("f<4>"), as NVRTC's name expressions.
    Scalar parameters follow torch's launcher: a Python int is passed as a 4-byte int (an 8-byte
    integer parameter is refused), a float as a double (a float parameter is refused).
    The compute capability, include directories and NVRTC options are ignored (the harness always
    defines __CUDA_ARCH__=900 and compiles without fast-math)."""
    try:
        return compile_source(kernel_source).get_function(kernel_name).for_torch_launcher()
    except AttributeError as e:
        raise CudaSourceError(f"Kernel compilation failed:\n{e}") from None
