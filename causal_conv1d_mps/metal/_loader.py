"""The Metal libraries: source assembly, one lazy compilation per kernel family and device kind, availability.

The kernels are compiled in families (`FAMILIES`), each its own library: `common.metal` and the generated
contract header (`_contract.msl_header`) followed by the family's file. The first call of an op compiles only
the families it needs, and a family that fails to compile (or lacks a kernel the launchers call) sends only
its ops to the reference path (see `fallback.py`); the others keep their kernels.

On `mps` tensors the sources are compiled by `torch.mps.compile_shader` (PyTorch >= 2.7; 2.6's private
`_compile_shader` is not used: whether it takes the list arguments the launchers pass is unverified); on
CPU tensors by the Linux test harness `metal_harness` of a source checkout, which runs the same kernels on
the CPU. Both return a library object with one callable per kernel host name, so the launchers are the same
for both.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from types import ModuleType

import torch

from .. import _checkout
from . import _contract

SOURCE_ENV_VAR = "CAUSAL_CONV1D_METAL_PATH"
KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
# Defines the helpers and macros the other files use, so it comes first in every family.
COMMON_FILE = "common.metal"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Family name -> (its .metal file, the kernel stems it defines, whether each is instantiated per width).
# Every stem is instantiated for each storage type: `<stem>_<type>_w1..w16` and `_wany` (per width), or
# `<stem>_<type>_wany` (generic only), or `<stem>_<type>` (no width); `reduce_rows_float` is plain.
_FAMILY_KERNELS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "causal_conv1d": ("causal_conv1d.metal", (("causal_conv1d_fwd", "widths"), ("causal_conv1d_bwd", "widths"),
                                              ("causal_conv1d_bwd_dinit", "any"))),
    "short_conv_fused": ("short_conv_fused.metal", (("short_conv_fused_fwd", "widths"),
                                                    ("short_conv_fused_bwd", "widths"),
                                                    ("short_conv_fused_bwd_dinit", "any"))),
    "short_conv_update": ("short_conv_update.metal", (("short_conv_update", "widths"),)),
    "states": ("states.metal", (("gather_states", "none"), ("reduce_rows_float", "plain"))),
}
FAMILIES: tuple[str, ...] = tuple(_FAMILY_KERNELS)
MAX_UNROLLED_WIDTH = 16
_TYPE_NAMES = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat"}


class MetalCompileError(RuntimeError):
    """A kernel family failed to compile, or its library lacks a kernel the launchers call.

    `family`: the family's name; `first_line`: the compiler's first error line (also in the message).
    """

    def __init__(self, family: str, first_line: str, details: str = ""):
        self.family = family
        self.first_line = first_line
        self.details = details
        super().__init__(f"Metal kernel family {family!r} is unusable: {first_line}")


def kernel_name(stem: str, dtype: torch.dtype, width: int | str | None = None) -> str:
    """Host name of a kernel instantiation, e.g. `causal_conv1d_fwd_bfloat_w4`.

    `width`: the convolution width (widths above MAX_UNROLLED_WIDTH get the generic `_wany` kernel),
    "any" for kernels instantiated only generically, None for kernels not templated over the width.
    """
    name = f"{stem}_{_TYPE_NAMES[dtype]}"
    if width is None:
        return name
    if width == "any" or width > MAX_UNROLLED_WIDTH:
        return f"{name}_wany"
    return f"{name}_w{width}"


def family_kernel_names(family: str, dtype: torch.dtype) -> list[str]:
    """Every kernel host name of `family` the launchers may call for x of `dtype`."""
    names = []
    for stem, kind in _FAMILY_KERNELS[family][1]:
        if kind == "widths":
            names += [kernel_name(stem, dtype, w) for w in (*range(1, MAX_UNROLLED_WIDTH + 1), "any")]
        elif kind == "any":
            names.append(kernel_name(stem, dtype, "any"))
        elif kind == "none":
            names.append(kernel_name(stem, dtype))
        else:
            names.append(stem)
    return names


def _source_root() -> Path:
    override = os.environ.get(SOURCE_ENV_VAR)
    root = Path(override) if override else KERNEL_DIR
    if not root.exists():
        raise FileNotFoundError(f"{SOURCE_ENV_VAR}: expected a .metal file or a folder of them, got {str(root)!r}")
    return root


def source_files(family: str | None = None) -> list[Path]:
    """The `.metal` files compiled, in order: `common.metal`, then the family's file (every file when `family`
    is None). With `CAUSAL_CONV1D_METAL_PATH` naming a folder (kernel development), its files replace the
    packaged ones of the same name (a file it lacks comes from the package), and its other `.metal` files are
    compiled into every family, after `common.metal`; naming one file, that file is the whole source of
    every family. A path that is neither, or a folder without `.metal` files, is a FileNotFoundError."""
    root = _source_root()
    if root.is_file():
        return [root]
    files = sorted(root.glob("*.metal"), key=lambda p: (p.name != COMMON_FILE, p.name))
    if not files:
        raise FileNotFoundError(f"{SOURCE_ENV_VAR}: no .metal files in {str(root)!r}")
    if family is None:
        return files
    own = {COMMON_FILE} | {kernel_file for kernel_file, _ in _FAMILY_KERNELS.values()}
    extras = [p for p in files if p.name not in own]
    found = []
    for name in (COMMON_FILE, _FAMILY_KERNELS[family][0]):
        path = root / name
        found.append(path if path.is_file() else KERNEL_DIR / name)
    return found[:1] + extras + found[1:]


def _line_directive(path: Path) -> str:
    """`#line 1 "<path>"`: compiler messages then name the real file and line (Apple's compiler, the harness
    and clang alike). Metal reads sources as ASCII, so a non-ASCII path is reduced to the file's name."""
    name = str(path) if str(path).isascii() else path.name.encode("ascii", "replace").decode()
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'#line 1 "{quoted}"\n'


def _read_ascii(path: Path) -> str:
    """The file's text; a non-ASCII byte (Metal reads sources as ASCII) is a SyntaxError naming its place."""
    data = path.read_bytes()
    for offset, byte in enumerate(data):
        if byte > 127:
            line = data.count(b"\n", 0, offset) + 1
            column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
            raise SyntaxError(f"{path}:{line}:{column}: error: non-ASCII byte 0x{byte:02x} (Metal sources are "
                              "read as ASCII, comments included)")
    return data.decode("ascii")


def kernel_source(family: str | None = None) -> str:
    """The compilation unit of `family` (every file when None): the generated contract header, then the
    source files, each preceded by a `#line` directive naming it."""
    parts = [_line_directive(Path(_contract.GENERATED_NAME)), _contract.msl_header()]
    for path in source_files(family):
        parts.append(_line_directive(path))
        text = _read_ascii(path)
        parts.append(text if text.endswith("\n") else text + "\n")
    return "".join(parts)


def _mps_compiler():
    return getattr(torch.mps, "compile_shader", None)


def load_harness() -> ModuleType | None:
    """`metal_harness` from the installed packages, else from the source checkout holding this package."""
    return _checkout.load_harness("metal_harness")


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


_DIAGNOSTIC = re.compile(r"[^\s\"']*:\d+:\d+: (?:fatal )?error: [^\n]*")


def first_error_line(message: str) -> str:
    """The compiler's first error line in `message`: the first `file:line:col: error: ...` diagnostic (Metal's
    own are wrapped in an NSError description on one line), else the first line saying `error`, else the
    first line."""
    found = _DIAGNOSTIC.search(str(message))
    if found:
        return found.group(0).strip().rstrip('"')
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower():
            return line
    return lines[0] if lines else "(no compiler message)"


# (device type, source override, family) -> the library, or the MetalCompileError it raised.
_libraries: dict[tuple[str, str, str], object] = {}


def _compile(device: torch.device, source: str):
    if device.type == "mps":
        lib = _mps_compiler()(source)
    else:
        lib = load_harness().compile_library(source)
    dir(lib)  # some releases compile at the first use of the library: make errors surface here
    return lib


def compile_family(device: torch.device, family: str):
    """The compiled library of kernel family `family` for tensors on `device` (compiled once, cached).

    Raises MetalCompileError (the compiler's first error line in its message) when the source does not
    compile (a non-ASCII byte included); the failure is cached too, so a broken family is compiled once per
    process. A bad CAUSAL_CONV1D_METAL_PATH raises FileNotFoundError (a configuration error, not a fallback).
    """
    if family not in _FAMILY_KERNELS:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    key = (device.type, os.environ.get(SOURCE_ENV_VAR, ""), family)
    found = _libraries.get(key)
    if found is None:
        try:  # a bad CAUSAL_CONV1D_METAL_PATH raises FileNotFoundError: not caught
            found = _compile(device, kernel_source(family))
        except (SyntaxError, RuntimeError) as exc:  # compile_shader raises SyntaxError or RuntimeError
            found = MetalCompileError(family, first_error_line(str(exc)), str(exc))
        _libraries[key] = found
    if isinstance(found, MetalCompileError):
        raise found
    return found


# (device type, source override, family, dtype) -> None when every kernel is present, else the error.
_checked: dict[tuple, MetalCompileError | None] = {}


def family_library(device: torch.device, family: str, dtype: torch.dtype):
    """`compile_family`, and a check that every kernel of `family` for x of `dtype` is in `dir(lib)` (a
    bfloat kernel is absent where Metal < 3.1 skipped it); raises MetalCompileError otherwise."""
    lib = compile_family(device, family)
    key = (device.type, os.environ.get(SOURCE_ENV_VAR, ""), family, dtype)
    if key not in _checked:
        present = set(dir(lib))
        missing = [n for n in family_kernel_names(family, dtype) if n not in present]
        _checked[key] = (MetalCompileError(family, f"kernel {missing[0]!r} is missing from the compiled library "
                                                   f"({len(missing)} kernels for {dtype} missing)")
                         if missing else None)
    if _checked[key] is not None:
        raise _checked[key]
    return lib


def clear_cache() -> None:
    """Forget compiled libraries and failures (tests that change the sources use this)."""
    _libraries.clear()
    _checked.clear()
