"""The Metal library: source assembly, one compilation per process and device kind, availability.

On `mps` tensors the sources are compiled by `torch.mps.compile_shader` (PyTorch >= 2.7; 2.6's private
`_compile_shader` is not used: whether it takes the list arguments the launchers pass is unverified); on
CPU tensors by the Linux test harness `metal_harness` of a source checkout, which runs the same kernels on
the CPU. Both return a library object with one callable per kernel host name, so the
launchers are the same for both.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

SOURCE_ENV_VAR = "CAUSAL_CONV1D_METAL_PATH"
KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
# Defines the helpers and macros the other files use, so it comes first.
COMMON_FILE = "common.metal"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REPO_ROOT = Path(__file__).resolve().parent.parent.parent

_libraries: dict[tuple[str, str], object] = {}


def source_files() -> list[Path]:
    """The `.metal` files compiled, in order: the packaged ones, or those `CAUSAL_CONV1D_METAL_PATH` names."""
    override = os.environ.get(SOURCE_ENV_VAR)
    root = Path(override) if override else KERNEL_DIR
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{SOURCE_ENV_VAR}: expected a .metal file or a folder of them, got {str(root)!r}")
    files = sorted(root.glob("*.metal"), key=lambda p: (p.name != COMMON_FILE, p.name))
    if not files:
        raise FileNotFoundError(f"{SOURCE_ENV_VAR}: no .metal files in {str(root)!r}")
    return files


def kernel_source() -> str:
    """Every source file concatenated into one compilation unit."""
    parts = []
    for path in source_files():
        parts.append(f"// ---- {path.name} ----\n")
        parts.append(path.read_text(encoding="ascii"))
    return "".join(parts)


def _mps_compiler():
    return getattr(torch.mps, "compile_shader", None)


@functools.lru_cache(maxsize=1)
def load_harness() -> ModuleType | None:
    """`metal_harness` from the installed packages, else from the source checkout holding this package."""
    try:
        return importlib.import_module("metal_harness")
    except ImportError:
        pass
    init = _REPO_ROOT / "metal_harness" / "__init__.py"
    if not init.is_file():
        return None
    spec = importlib.util.spec_from_file_location("metal_harness", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["metal_harness"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules["metal_harness"]
        raise
    return module


@functools.lru_cache(maxsize=None)
def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the Metal kernels can run on (device, dtype); otherwise a short reason."""
    if dtype not in SUPPORTED_DTYPES:
        if dtype == torch.float64:
            return "Metal has no float64 arithmetic"
        return f"the Metal kernels support float32, float16 and bfloat16, not {dtype}"
    if device.type == "mps":
        if _mps_compiler() is None:
            return f"PyTorch {torch.__version__} has no torch.mps.compile_shader (needs PyTorch >= 2.7)"
        if dtype == torch.bfloat16:
            newer = getattr(torch.backends.mps, "is_macos_or_newer", None)
            if newer is not None and not newer(14, 0):
                return "bfloat16 Metal kernels need macOS 14 or newer"
        return None
    if device.type == "cpu":
        try:
            harness = load_harness()
        except Exception as exc:  # a broken checkout must not break the reference path
            return f"metal_harness failed to import: {exc}"
        if harness is None or not hasattr(harness, "compile_library"):
            return "metal_harness (the Linux test harness of a source checkout) is not available"
        return harness.unavailable_reason()
    return f"the Metal kernels run on mps (or on cpu through metal_harness), not on {device.type}"


def library(device: torch.device):
    """The compiled library for tensors on `device`, compiled on first use and cached."""
    key = (device.type, os.environ.get(SOURCE_ENV_VAR, ""))
    lib = _libraries.get(key)
    if lib is None:
        source = kernel_source()
        if device.type == "mps":
            lib = _mps_compiler()(source)
        else:
            lib = load_harness().compile_library(source)
        _libraries[key] = lib
    return lib
