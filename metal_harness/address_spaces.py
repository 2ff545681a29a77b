"""The address-space check: compile Metal source with its address spaces enforced.

The harness proper defines `device`, `thread`, ... away, so it cannot see a type error that exists only
because Metal's pointer and class types carry an address space (for example a conditional expression whose
operands are a class prvalue and a `thread` lvalue of that class). This check compiles the same source with
clang in C++-for-OpenCL mode, where address spaces are part of every type as in Metal: `device`, `constant`,
`thread`, `threadgroup` become `__global`, `__constant`, `__private`, `__local`, Metal's builtins are
declared by a small header (`address_spaces/metal_stdlib`) and `bfloat` is a class with explicit-only
conversion from float. Every `[[host_name]]` instantiation becomes an explicit instantiation, so every kernel
is checked for every type and width. `-fsyntax-only`: nothing is built.

OpenCL's generic address space stays on (clang needs it for its implicit copy constructors), so a pointer
or reference written without an address space is accepted here; the shipped kernels always write one.
"""

from __future__ import annotations

import functools
import pathlib
import re
import subprocess

from ._compiler import CompilerNotFound, find_compiler
from ._source import MetalSourceError

SHIM_DIR = pathlib.Path(__file__).resolve().parent / "address_spaces"
LANGUAGE = ["-x", "clcpp", "-cl-std=clc++2021", "-cl-no-stdinc", "-I", str(SHIM_DIR),
            "-D__METAL_VERSION__=310", "-DMETAL_ADDRESS_SPACE_CHECK=1"]

# `template [[host_name("n")]] [[kernel]] decltype(f<T>) f<T>;` after macro expansion (`kernel` is empty).
_INSTANTIATION = re.compile(r"\btemplate\s*((?:\[\[.*?\]\]\s*)+)(?=[A-Za-z_])", re.DOTALL)
# `threadgroup T name[N];` inside a function (after expansion: `__local`).
_THREADGROUP_ARRAY = re.compile(r"([;{}]\s*(?:#[^\n]*\n\s*)*)__local\s+([^;*&=(){}\[\]]+?)\s+(\w+)\s*"
                                r"((?:\[[^\];]+\]\s*)+);")


def _run(command: list[str], text: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, input=text, capture_output=True, text=True)


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """None when the harness's compiler accepts C++ for OpenCL; otherwise why the check cannot run."""
    try:
        compiler, description = find_compiler()
    except CompilerNotFound as e:
        return str(e)
    result = _run(list(compiler) + [*LANGUAGE, "-fsyntax-only", "-"], "void f(__global int* p) { p[0] = 1; }\n")
    if result.returncode != 0:
        return f"{description} does not compile C++ for OpenCL (-x clcpp -cl-std=clc++2021): {result.stderr[:300]}"
    return None


def translate(source: str, filename: str = "kernels.metal") -> tuple[str, int]:
    """(C++-for-OpenCL text, number of kernel instantiations) of Metal `source`, macro-expanded."""
    compiler, _ = find_compiler()
    result = _run(list(compiler) + ["-E", *LANGUAGE, "-"], f'#line 1 "{filename}"\n' + source)
    if result.returncode != 0:
        raise MetalSourceError(f"preprocessing {filename} for the address-space check failed:\n{result.stderr}")
    text = result.stdout
    count = 0

    def instantiation(m: re.Match) -> str:
        nonlocal count
        if "host_name" not in m.group(1):
            return m.group(0)
        count += 1
        return "template " + "\n" * m.group(1).count("\n")

    text = _INSTANTIATION.sub(instantiation, text)
    text = _THREADGROUP_ARRAY.sub(
        lambda m: (f"{m.group(1)}__local {m.group(2)} (&{m.group(3)}){m.group(4).strip()} = "
                   f"*mh_threadgroup_storage<{m.group(2)} {m.group(4).strip()}>();"), text)
    return text, count


def check_address_spaces(source: str, filename: str = "kernels.metal") -> int:
    """Compiles Metal `source` with address spaces enforced; returns how many kernel instantiations were
    checked. Raises MetalSourceError (a SyntaxError) with the compiler's messages on any error."""
    text, count = translate(source, filename)
    compiler, _ = find_compiler()
    result = _run(list(compiler) + [*LANGUAGE, "-fsyntax-only", "-w", "-ferror-limit=20", "-"], text)
    if result.returncode != 0:
        raise MetalSourceError(f"the address-space check of {filename} failed (C++ for OpenCL, address spaces "
                               f"enforced):\n{result.stderr}")
    return count
