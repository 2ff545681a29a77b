"""The test-only CPU harnesses (`metal_harness`, `cuda_harness`) of a source checkout.

They live at the repository root beside this package and are not installed with it: the backends load
one when CPU tensors ask for kernels of that language (tests and CI).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def load_harness(name: str) -> ModuleType | None:
    """Package `name` from the installed packages, else from the source checkout holding this package;
    None where neither has it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    init = REPO_ROOT / name / "__init__.py"
    if not init.is_file():
        return None
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module
