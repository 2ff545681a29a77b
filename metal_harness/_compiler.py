"""Finding a C++ compiler that can build Metal kernels, and building them (cached on disk).

clang >= 16 is needed (`_Float16` arithmetic, `ext_vector_type`, template deduction on vector
types). Looked for, in order: $METAL_HARNESS_CXX, clang++-16 ... clang++-20, clang++, and the
`ziglang` PyPI package (`python -m ziglang c++`, which bundles a clang).

cuda_harness builds CUDA kernels with the same functions and the same executor: the keyword
arguments (`compiler_vars`, `cache_var`, `flags`, `include_dirs`, `language`) name its settings.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
INCLUDE_DIR = PACKAGE_DIR / "include"
EXECUTOR_SOURCE = PACKAGE_DIR / "runtime" / "executor.cpp"
MIN_CLANG = 16

# Metal semantics the flags stand for: half arithmetic rounds after every operation (no excess
# precision), no contraction of a*b+c into fma behind the kernel's back, pointer casts between
# element types are the norm in kernels (no strict aliasing).
BASE_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing",
                "-Xclang", "-ffloat16-excess-precision=none", "-Wno-unknown-attributes",
                "-Wno-unknown-pragmas", "-Wno-unused-variable", "-Wno-unused-function"]
# Extra flags from the environment (e.g. "-g", or "-DMH_USE_UCONTEXT" to test the portable fibers).
COMMON_FLAGS = BASE_FLAGS + os.environ.get("METAL_HARNESS_CXXFLAGS", "").split()
PREPROCESSOR_DEFINES = ["-D__METAL_VERSION__=310", "-D__HAVE_BFLOAT__=1", "-DMETAL_HARNESS=1"]


class CompilerNotFound(RuntimeError):
    pass


def cache_dir(cache_var: str = "METAL_HARNESS_CACHE", default_name: str = "ccmps-metal-harness") -> pathlib.Path:
    root = os.environ.get(cache_var) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), default_name)
    path = pathlib.Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _clang_major(command: list[str]) -> int | None:
    try:
        out = subprocess.run(command + ["--version"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"clang version (\d+)", out)
    return int(m.group(1)) if m else None


def find_compiler(compiler_vars: tuple[str, ...] = ("METAL_HARNESS_CXX",)) -> tuple[tuple[str, ...], str]:
    """(command, description) of a usable compiler; raises CompilerNotFound with what was tried.
    `compiler_vars`: environment variables that name a compiler, the first one set wins."""
    override = next((os.environ[v] for v in compiler_vars if os.environ.get(v)), None)
    return _find_compiler(override, compiler_vars[0])


@functools.lru_cache(maxsize=None)
def _find_compiler(override: str | None, override_var: str) -> tuple[tuple[str, ...], str]:
    tried = []
    candidates: list[list[str]] = []
    if override:
        candidates.append(override.split())
    candidates += [[f"clang++-{v}"] for v in range(MIN_CLANG, 21)] + [["clang++"]]
    for command in candidates:
        if not shutil.which(command[0]):
            tried.append(f"{command[0]} (not found)")
            continue
        major = _clang_major(command)
        if major is not None and major >= MIN_CLANG:
            return tuple(command), f"{' '.join(command)} (clang {major})"
        tried.append(f"{' '.join(command)} (clang {major}, need >= {MIN_CLANG})")
    try:
        import ziglang  # noqa: F401  (only to know it is installed)
        command = [sys.executable, "-m", "ziglang", "c++"]
        major = _clang_major(command)
        if major is not None and major >= MIN_CLANG:
            return tuple(command), f"python -m ziglang c++ (clang {major})"
        tried.append(f"ziglang (clang {major})")
    except ImportError:
        tried.append("ziglang (not installed)")
    raise CompilerNotFound(
        f"no C++ compiler with clang >= {MIN_CLANG} was found (tried: {', '.join(tried)}); install one with "
        f"`apt-get install clang-16` or `pip install ziglang`, or name one in {override_var}")


def _run(command: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, input=stdin, capture_output=True, text=True)


def preprocess(source: str, filename: str, defines: list[str] = PREPROCESSOR_DEFINES,
               compiler_vars: tuple[str, ...] = ("METAL_HARNESS_CXX",)) -> str:
    """Macro-expands `source` (its includes already removed), keeping line markers."""
    compiler, _ = find_compiler(compiler_vars)
    text = f'#line 1 "{filename}"\n' + source
    result = _run(list(compiler) + ["-E", "-x", "c++", "-std=c++17", "-nostdinc", *defines, "-"],
                  stdin=text)
    if result.returncode != 0:
        raise SyntaxError(f"preprocessing {filename} failed:\n{result.stderr}")
    return result.stdout


def fingerprint(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:32]


@functools.lru_cache(maxsize=None)
def harness_fingerprint() -> str:
    """Changes whenever the shim, the runtime or the pre-pass changes: part of every cache key."""
    files = sorted(INCLUDE_DIR.iterdir()) + [EXECUTOR_SOURCE] + sorted(PACKAGE_DIR.glob("*.py"))
    compiler, description = find_compiler()
    return fingerprint(description, *COMMON_FLAGS, *(f.read_bytes() for f in files))


@functools.lru_cache(maxsize=None)
def executor_library() -> ctypes.CDLL:
    """The executor, built once per harness version and loaded once per process with global
    symbols: every kernel library resolves mh::rt_* against it, so there is one scheduler and one
    pool of fiber stacks per thread however many kernels are loaded."""
    path = cache_dir() / f"executor-{harness_fingerprint()}.so"
    if not path.exists():
        compiler, _ = find_compiler()
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            out = pathlib.Path(tmp) / "executor.so"
            result = _run(list(compiler) + COMMON_FLAGS + ["-shared", "-I", str(INCLUDE_DIR), str(EXECUTOR_SOURCE),
                                                           "-o", str(out)])
            if result.returncode != 0:
                raise RuntimeError(f"building the harness executor failed:\n{result.stderr}")
            os.replace(out, path)
    dll = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    dll.mh_dispatch.restype = ctypes.c_int
    dll.mh_dispatch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t,
                                ctypes.POINTER(ctypes.c_uint64)]
    dll.mh_guarded_alloc.restype = ctypes.c_void_p
    dll.mh_guarded_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p,
                                     ctypes.c_void_p]
    dll.mh_guarded_free.restype = None
    dll.mh_guarded_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return dll


def _compile_error(stderr: str, language: str) -> SyntaxError:
    return SyntaxError(f"compiling the {language} source as C++ failed:\n{stderr}")


def check_syntax(cpp: str, *, compiler_vars: tuple[str, ...] = ("METAL_HARNESS_CXX",),
                 cache: pathlib.Path | None = None, flags: list[str] = COMMON_FLAGS,
                 include_dirs: tuple[pathlib.Path, ...] = (INCLUDE_DIR,), language: str = "Metal") -> None:
    """Full semantic check of a translation unit (every template instantiated), no code generated."""
    compiler, _ = find_compiler(compiler_vars)
    includes = [arg for d in include_dirs for arg in ("-I", str(d))]
    with tempfile.TemporaryDirectory(dir=cache or cache_dir()) as tmp:
        src = pathlib.Path(tmp) / "kernels.cpp"
        src.write_text(cpp)
        result = _run(list(compiler) + flags + ["-fsyntax-only", *includes, str(src)])
    if result.returncode != 0:
        raise _compile_error(result.stderr, language)


def build_shared_library(cpp: str, key: str, *, compiler_vars: tuple[str, ...] = ("METAL_HARNESS_CXX",),
                         cache: pathlib.Path | None = None, flags: list[str] = COMMON_FLAGS,
                         include_dirs: tuple[pathlib.Path, ...] = (INCLUDE_DIR,),
                         language: str = "Metal") -> pathlib.Path:
    """Compiles `cpp` into a shared library named by `key` (cached on disk). It calls into the
    executor library, which must be loaded (executor_library()) before it is."""
    cache = cache or cache_dir()
    path = cache / f"{key}.so"
    if path.exists():
        return path
    compiler, _ = find_compiler(compiler_vars)
    includes = [arg for d in include_dirs for arg in ("-I", str(d))]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = pathlib.Path(tmp) / "kernels.cpp"
        src.write_text(cpp)
        out = pathlib.Path(tmp) / "kernels.so"
        result = _run(list(compiler) + flags + ["-shared", *includes, str(src), "-o", str(out)])
        if result.returncode != 0:
            raise _compile_error(result.stderr, language)
        os.replace(out, path)
    return path
