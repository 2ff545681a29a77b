"""The kernel set a tensor's device needs: compiled for cuda, interpreted for cpu.

Triton decides at *decoration* time whether `@triton.jit` builds a compiled or an interpreted kernel
(triton 3.6 and 3.9 both read `TRITON_INTERPRET` through `triton.knobs.runtime.interpret` when the
decorator runs, not when the kernel launches). So cpu tensors get their own copy of the `kernels`
package, imported under a private name while the interpreter knob is on; the regular import serves
cuda. Users need not export `TRITON_INTERPRET` themselves, and one process can use both devices.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from contextlib import contextmanager
from types import ModuleType

import torch

_KERNELS = "causal_conv1d_mps.triton.kernels"
_INTERPRETED_KERNELS = "causal_conv1d_mps.triton._interpreted_kernels"
_lock = threading.Lock()
_compiled: ModuleType | None = None
_interpreted: ModuleType | None = None
_compiled_is_interpreted: bool | None = None


@contextmanager
def _interpreter_on():
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.runtime, "scope"):
        with knobs.runtime.scope():
            knobs.runtime.interpret = True
            yield
        return
    previous = os.environ.get("TRITON_INTERPRET")  # triton releases before the knobs module
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _import_interpreted() -> ModuleType:
    """Import the `kernels` package again under a private name, with the interpreter knob on."""
    regular = importlib.util.find_spec(_KERNELS)
    spec = importlib.util.spec_from_file_location(
        _INTERPRETED_KERNELS, regular.origin, submodule_search_locations=list(regular.submodule_search_locations))
    module = importlib.util.module_from_spec(spec)
    sys.modules[_INTERPRETED_KERNELS] = module
    try:
        with _interpreter_on():
            spec.loader.exec_module(module)  # its relative imports land under the private name too
    except BaseException:
        for name in [n for n in sys.modules if n.startswith(_INTERPRETED_KERNELS)]:
            del sys.modules[name]
        raise
    return module


def kernels_for(device: torch.device) -> ModuleType:
    """The `kernels` package whose kernels run on `device` (interpreted on cpu, compiled otherwise)."""
    global _compiled, _interpreted
    if device.type == "cpu":
        if _interpreted is None:
            with _lock:
                if _interpreted is None:
                    _interpreted = _import_interpreted()
        return _interpreted
    if _compiled is None:
        _compiled = importlib.import_module(_KERNELS)
    return _compiled


def is_interpreted(device: torch.device) -> bool:
    """Whether kernels for `device` run in Triton's interpreter (launch configs differ there)."""
    global _compiled_is_interpreted
    if device.type == "cpu":
        return True
    if _compiled_is_interpreted is None:  # fixed when the compiled package was decorated
        kernels_for(device)
        _compiled_is_interpreted = type(_compiled.conv_fwd_kernel).__name__ == "InterpretedFunction"
    return _compiled_is_interpreted


_interpreter_problem: str | None = None
_interpreter_checked = False


def interpreter_problem() -> str | None:
    """None when Triton's interpreter runs our kernels here; else why not (checked once, by running a loop).

    Seen on the GPU image (triton 3.6 with numpy 2.5): the interpreter turns loop bounds into one-element
    arrays and `int()` of those is an error in numpy >= 2.5, so every kernel with a loop fails.
    """
    global _interpreter_problem, _interpreter_checked
    if not _interpreter_checked:
        try:
            out = torch.zeros(1, dtype=torch.int32)
            kernels_for(torch.device("cpu")).loop_probe_kernel[(1,)](out, 3)
            if int(out[0]) != 3:
                _interpreter_problem = f"Triton's interpreter counted a 3-step loop as {int(out[0])}"
        except Exception as exc:  # any failure means the kernels cannot run on cpu here
            import numpy
            import triton

            _interpreter_problem = (f"Triton's interpreter cannot run loops here (triton {triton.__version__}, "
                                    f"numpy {numpy.__version__}: {type(exc).__name__}: {exc}); "
                                    f"triton 3.9 with numpy 2.4 works")
        _interpreter_checked = True
    return _interpreter_problem
