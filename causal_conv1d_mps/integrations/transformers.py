"""Hugging Face transformers' hybrid models run their short convolutions on this package.

    import causal_conv1d_mps.integrations.transformers as cc_hf
    cc_hf.enable()        # every model family, already imported or not, on cpu, cuda and mps
    ...
    cc_hf.disable()       # transformers' own functions again
    with cc_hf.enabled(): # or for a block only
        ...

transformers (>= 5.15, < 6) defines `causal_conv1d_fn(hidden_states, weight, bias, activation, **kwargs)`
and `causal_conv1d_update(hidden_states, conv_state, weight, bias, activation)` in the modeling file of
each hybrid family (LFM2, Mamba, Mamba2, Qwen3-Next, ...), most decorated to take Dao-AILab's
`causal_conv1d` package when it is importable, else their PyTorch code (LFM3 in 5.23 keeps undecorated ones). The
layers call these names as module globals at every call, so `enable()` rebinds them in every
`transformers.models.*.modeling_*` module, now and at later imports (through an import hook), and
`disable()` puts the originals back. Models built before either call follow at their next forward.

Where transformers resolved a function to another package at import (Dao's `causal_conv1d` on an NVIDIA
machine), that function is kept unless `enable(force=True)`. Hub kernels chosen with `use_kernels=True` /
`kernelize` for these two functions are bypassed while enabled (call `disable()` to use them).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import re
import sys
import threading
from types import ModuleType

from torch import Tensor

from .. import api
from ._post_import import PostImportHook

SUPPORTED_VERSIONS = ">=5.15,<6"
_MIN_VERSION, _END_VERSION = (5, 15), (6, 0)

# Leading parameters of transformers' functions (5.15 to 5.24); other signatures are left alone.
_EXPECTED_PARAMETERS = {
    "causal_conv1d_fn": ("hidden_states", "weight", "bias", "activation"),
    "causal_conv1d_update": ("hidden_states", "conv_state", "weight", "bias", "activation"),
}


def causal_conv1d_fn(hidden_states: Tensor, weight: Tensor, bias: Tensor | None = None,
                     activation: str | None = None, *, seq_idx: Tensor | None = None,
                     cu_seqlens: Tensor | None = None, initial_states: Tensor | None = None,
                     return_final_states: bool = False, final_states_out: Tensor | None = None, **unused):
    """Drop-in for transformers' `causal_conv1d_fn`: `hidden_states` `[B, D, T]` -> `[B, D, T]`.

    `weight` `[D, W]` (any width), `bias` `[D]` or None, `activation` None, 'silu' or 'swish'.
    Packed sequences: `seq_idx` `[B, T]` (what `DataCollatorWithFlattening(return_seq_idx=True)` gives the
    model) or `cu_seqlens` `[N+1]` with B == 1. The Dao-style keywords (`initial_states`,
    `return_final_states`, `final_states_out`) are honoured; the other keyword arguments the layers forward
    (`position_ids`, `cu_seq_lens_q`, attention flags, ...) do not concern the convolution and are ignored,
    as transformers' own function ignores them.
    """
    return api.causal_conv1d_fn(hidden_states, weight, bias, seq_idx, initial_states, return_final_states,
                                final_states_out, activation, cu_seqlens=cu_seqlens)


def causal_conv1d_update(hidden_states: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                         activation: str | None = None, cache_seqlens: Tensor | None = None,
                         conv_state_indices: Tensor | None = None) -> Tensor:
    """Drop-in for transformers' `causal_conv1d_update`: `hidden_states` `[B, D]` or `[B, D, L]`.

    `conv_state` `[B, D, S]` with S >= W-1 (transformers' caches keep S = W) is updated in place, newest
    input last. A state kept in another dtype than the activations (a cache created under another
    dtype) is honoured the way transformers does: the step runs in the state's dtype and the output
    returns in the activations' dtype.
    """
    x = hidden_states
    if isinstance(x, Tensor) and isinstance(conv_state, Tensor) and conv_state.dtype != x.dtype \
            and x.is_floating_point() and conv_state.is_floating_point():
        out = api.causal_conv1d_update(x.to(conv_state.dtype), conv_state, weight, bias, activation,
                                       cache_seqlens, conv_state_indices)
        return out.to(x.dtype)
    return api.causal_conv1d_update(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)


_REPLACEMENTS = {"causal_conv1d_fn": causal_conv1d_fn, "causal_conv1d_update": causal_conv1d_update}


def _is_modeling_module(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 4 and parts[:2] == ["transformers", "models"] and parts[3].startswith("modeling_")


def _version_tuple(text: str) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def _check_transformers_version() -> None:
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("causal_conv1d_mps.integrations.transformers: transformers is not installed; "
                          "install it with pip install 'causal-conv1d-mps[transformers]'") from None
    if not _MIN_VERSION <= _version_tuple(version) < _END_VERSION:
        raise RuntimeError(f"causal_conv1d_mps.integrations.transformers: expected transformers "
                           f"{SUPPORTED_VERSIONS}, got {version} (older versions call these functions only "
                           f"from their CUDA fast path; newer ones are untested)")


def _has_expected_signature(func, name: str) -> bool:
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return True
    expected = _EXPECTED_PARAMETERS[name]
    return tuple(p.name for p in params[:len(expected)]) == expected


def _foreign_implementation(func, depth: int = 0) -> str | None:
    """The module of the implementation transformers' hub-kernel wrapper took from another package at
    import (`causal_conv1d` for Dao's), or None where it runs transformers' own PyTorch code.

    The wrapper of `use_kernel_func_from_hub_with_fallback` keeps `implementation` and
    `is_new_implementation` in its closure; with the `kernels` package installed the wrapper sits inside
    an `nn.Module` whose `forward` closes over it as `func`.
    """
    if depth > 3:
        return None
    candidates = [func, getattr(type(func), "forward", None)]
    for candidate in candidates:
        if candidate is None or not inspect.isfunction(candidate):
            continue
        try:
            nonlocals = inspect.getclosurevars(candidate).nonlocals
        except (TypeError, ValueError):
            continue
        implementation = nonlocals.get("implementation")
        if nonlocals.get("is_new_implementation") and implementation is not None:
            return getattr(implementation, "__module__", None) or type(implementation).__name__
        inner = nonlocals.get("func")
        if inner is not None and inner is not func:
            found = _foreign_implementation(inner, depth + 1)
            if found:
                return found
    return None


class _Registry:
    """What `enable()` replaced, where, and what it kept (with the reason). All access under `lock`."""

    def __init__(self):
        self.lock = threading.RLock()
        self.active = False
        self.force = False
        self.originals: dict[tuple[str, str], object] = {}
        self.kept: dict[tuple[str, str], str] = {}
        self.hook = PostImportHook(_is_modeling_module, self.patch_after_import)

    def patch_after_import(self, module: ModuleType) -> None:
        with self.lock:
            if self.active:
                self.patch(module)

    def patch(self, module: ModuleType) -> None:
        for name, replacement in _REPLACEMENTS.items():
            current = module.__dict__.get(name)
            if current is None or current is replacement or not callable(current):
                continue
            key = (module.__name__, name)
            if not _has_expected_signature(current, name):
                self.kept[key] = "kept: unexpected signature (not transformers' function of 5.15 to 5.24)"
                continue
            foreign = _foreign_implementation(current)
            if foreign is not None and not self.force:
                self.kept[key] = f"kept: {foreign} (enable(force=True) replaces it)"
                continue
            self.kept.pop(key, None)
            self.originals[key] = current
            setattr(module, name, replacement)

    def restore(self) -> None:
        for (module_name, name), original in self.originals.items():
            module = sys.modules.get(module_name)
            if module is not None and module.__dict__.get(name) is _REPLACEMENTS[name]:
                setattr(module, name, original)
        self.originals.clear()
        self.kept.clear()


_registry = _Registry()


def enable(*, force: bool = False) -> None:
    """Make transformers' hybrid models run `causal_conv1d_fn` / `causal_conv1d_update` on this package.

    Applies to every `transformers.models.*.modeling_*` module that defines them, imported now or later,
    and to models already built. Functions that transformers took from another package at import (Dao's
    `causal_conv1d`) are kept unless `force=True`. Idempotent; `disable()` undoes it. Raises ImportError
    without transformers and RuntimeError outside transformers `SUPPORTED_VERSIONS`.
    """
    _check_transformers_version()
    with _registry.lock:
        if _registry.active and _registry.force != bool(force):
            _registry.restore()
        _registry.active, _registry.force = True, bool(force)
        _registry.hook.install()
        for name, module in list(sys.modules.items()):
            if _is_modeling_module(name) and isinstance(module, ModuleType):
                _registry.patch(module)


def disable() -> None:
    """Put transformers' own functions back everywhere `enable()` replaced them; stop patching new imports."""
    with _registry.lock:
        _registry.hook.uninstall()
        _registry.restore()
        _registry.active = _registry.force = False


def is_enabled() -> bool:
    return _registry.active


@contextlib.contextmanager
def enabled(*, force: bool = False):
    """`enable(force=force)` for the `with` block; the previous state (enabled or not, force) returns after."""
    with _registry.lock:
        previous = (_registry.active, _registry.force)
    enable(force=force)
    try:
        yield
    finally:
        if previous[0]:
            enable(force=previous[1])
        else:
            disable()


def status() -> dict[str, dict[str, str]]:
    """`{modeling module: {function name: 'causal_conv1d_mps' or 'kept: <reason>'}}` of what `enable()` met."""
    with _registry.lock:
        report: dict[str, dict[str, str]] = {}
        for module_name, name in _registry.originals:
            report.setdefault(module_name, {})[name] = "causal_conv1d_mps"
        for (module_name, name), reason in _registry.kept.items():
            report.setdefault(module_name, {})[name] = reason
        return report
