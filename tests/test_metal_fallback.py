"""A kernel family that does not compile is a fallback, never a crash (through the Linux harness).

Broken sources come from `CAUSAL_CONV1D_METAL_PATH` (a copy of the packaged kernels with one file
broken); the other failures (compile_shader raising at first use, a missing kernel, a pipeline that cannot
run the backward's threadgroup) are injected around the harness's library."""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from causal_conv1d_mps import metal, reference
from causal_conv1d_mps._activation import IDENTITY, SILU
from causal_conv1d_mps.metal import _launch, _loader

_REASON = metal.unsupported_reason(torch.device("cpu"), torch.float32)
pytestmark = [pytest.mark.metal, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(_loader.SOURCE_ENV_VAR, raising=False)
    metal.clear_caches()
    yield
    metal.clear_caches()


@pytest.fixture
def kernel_copy(tmp_path, monkeypatch):
    """A copy of the packaged kernels, used instead of them; returns its folder."""
    folder = tmp_path / "kernels"
    shutil.copytree(_loader.KERNEL_DIR, folder)
    monkeypatch.setenv(_loader.SOURCE_ENV_VAR, str(folder))
    return folder


def _update_args(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, generator=gen).to(dtype)
    state = torch.randn(2, 8, 5, generator=gen).to(dtype)
    weight = torch.randn(8, 4, generator=gen)
    return x, state, weight


def _fwd_args(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 19, generator=gen).to(dtype)
    weight = torch.randn(8, 4, generator=gen)
    return x, weight


def _run_update(dtype=torch.float32):
    x, state, weight = _update_args(dtype)
    got_state = state.clone()
    out = metal.short_conv_update(x, got_state, weight, None, None, None, SILU, False)
    want_state = state.clone()
    want = reference.short_conv_update(x, want_state, weight, None, None, None, SILU, False)
    return out, want, got_state, want_state


def _fallback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "reference path" in str(w.message)]


def test_a_broken_family_falls_back_with_one_warning_and_the_others_keep_their_kernels(kernel_copy, monkeypatch):
    broken = kernel_copy / "short_conv_update.metal"
    broken.write_text(broken.read_text() + "\nthis is not metal;\n")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, want, got_state, want_state = _run_update()
        _run_update()  # a second call: no second warning, no second compilation
    messages = _fallback_warnings(record)
    assert len(messages) == 1, messages
    assert "'short_conv_update'" in messages[0] and f"{broken}:" in messages[0] and "error" in messages[0]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert torch.equal(got_state, want_state)

    # The other families still run their kernels: the reference must not be called.
    def no_reference(*args):
        raise AssertionError("the reference path ran although the causal_conv1d family compiles")

    monkeypatch.setattr(reference, "causal_conv1d_fwd", no_reference)
    x, weight = _fwd_args()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        metal.causal_conv1d_fwd(x, weight, None, None, None, IDENTITY, False)
    assert not _fallback_warnings(record)


def test_the_first_call_compiles_only_the_families_it_needs():
    _run_update()
    compiled = {key[2] for key in _loader._libraries}
    assert compiled == {"short_conv_update"}, compiled


def test_compile_family_raises_metal_compile_error_naming_the_file_and_line(kernel_copy):
    broken = kernel_copy / "states.metal"
    lines = broken.read_text().splitlines(keepends=True)
    lines.insert(3, "float broken_here(float v) { return v + not_declared; }\n")
    broken.write_text("".join(lines))
    with pytest.raises(_loader.MetalCompileError) as info:
        _loader.compile_family(CPU, "states")
    error = info.value
    assert error.family == "states"
    assert f"{broken}:4:" in error.first_line and "not_declared" in error.first_line, error.first_line
    assert error.first_line in str(error)
    with pytest.raises(_loader.MetalCompileError):  # cached: raised again without recompiling
        _loader.compile_family(CPU, "states")
    for family in _loader.FAMILIES:
        if family != "states":
            _loader.compile_family(CPU, family)


def test_a_non_ascii_byte_is_reported_in_its_own_file(kernel_copy):
    broken = kernel_copy / "short_conv_fused.metal"
    broken.write_text(broken.read_text().replace("// short_conv_fused", "// short_conv_fused \u00b5", 1))
    with pytest.raises(_loader.MetalCompileError, match=rf"{broken}:1:"):
        _loader.compile_family(CPU, "short_conv_fused")


def test_compile_shader_raising_runtime_error_at_first_use_falls_back(monkeypatch):
    def failing_compile(device, source):
        raise RuntimeError("program_source:12:5: error: use of undeclared identifier 'oops'\nmore lines")

    monkeypatch.setattr(_loader, "_compile", failing_compile)
    x, weight = _fwd_args()
    with pytest.warns(RuntimeWarning, match="program_source:12:5: error: use of undeclared identifier 'oops'"):
        out, _ = metal.causal_conv1d_fwd(x, weight, None, None, None, SILU, False)
    want, _ = reference.causal_conv1d_fwd(x, weight, None, None, None, SILU, False)
    assert torch.equal(out, want)


def test_missing_bfloat_kernels_send_only_bfloat16_to_the_reference(kernel_copy):
    """As on Metal < 3.1, where the guard skips every bfloat instantiation."""
    common = kernel_copy / "common.metal"
    text = common.read_text()
    assert "__METAL_VERSION__ >= 310" in text
    common.write_text(text.replace("__METAL_VERSION__ >= 310", "__METAL_VERSION__ >= 999"))
    with pytest.warns(RuntimeWarning, match=r"kernel 'short_conv_update_bfloat_w1' is missing"):
        out, want, _, _ = _run_update(torch.bfloat16)
    assert torch.equal(out, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run_update(torch.float32)  # the same family's float kernels are there: no warning


class _Recorder:
    """A library around the harness's: records launches; `max_threads` overrides the pipelines' limit."""

    def __init__(self, lib, max_threads=None, drop=(), unbuildable=()):
        self._lib, self._max_threads, self._drop, self.calls = lib, max_threads, set(drop), []
        self._unbuildable = set(unbuildable)

    def __dir__(self):
        return [n for n in dir(self._lib) if n not in self._drop]

    def __getattr__(self, name):
        if name in self.__dict__.get("_unbuildable", ()):
            raise RuntimeError(f"Failed to create function state object for: {name}")
        kernel = getattr(self._lib, name)
        recorder = self

        class Kernel:
            max_threads_per_threadgroup = recorder._max_threads or kernel.max_threads_per_threadgroup

            def __call__(self, *args, threads, group_size):
                recorder.calls.append((name, args, threads, group_size))
                kernel(*args, threads=threads, group_size=group_size)

        return Kernel()


def _record(monkeypatch, **kwargs) -> list[_Recorder]:
    made = []
    real = _loader._compile

    def compile_and_wrap(device, source):
        made.append(_Recorder(real(device, source), **kwargs))
        return made[-1]

    monkeypatch.setattr(_loader, "_compile", compile_and_wrap)
    return made


def test_a_missing_kernel_name_falls_back(monkeypatch):
    _record(monkeypatch, drop={"causal_conv1d_bwd_dinit_float_wany"})
    x, weight = _fwd_args()
    with pytest.warns(RuntimeWarning, match="causal_conv1d_bwd_dinit_float_wany' is missing"):
        out, _ = metal.causal_conv1d_fwd(x, weight, None, None, None, IDENTITY, False)
    assert torch.equal(out, reference.causal_conv1d_fwd(x, weight, None, None, None, IDENTITY, False)[0])


def test_backward_needs_its_full_threadgroup_or_falls_back(monkeypatch):
    _record(monkeypatch, max_threads=128)
    x, weight = _fwd_args()
    dout = torch.randn_like(x)
    with pytest.warns(RuntimeWarning, match="allows 128 threads per threadgroup; its threadgroup reduction needs 256"):
        got = metal.causal_conv1d_bwd(x, weight, None, None, None, dout, None, IDENTITY)
    want = reference.causal_conv1d_bwd(x, weight, None, None, None, dout, None, IDENTITY)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_group_size_never_exceeds_the_grid_except_for_full_group_kernels(monkeypatch):
    libs = _record(monkeypatch)
    x, weight = _fwd_args()
    metal.causal_conv1d_fwd(x, weight, None, None, None, IDENTITY, True)  # final states: 8 * 3 = 24 threads
    metal.causal_conv1d_bwd(x, weight, None, None, None, torch.randn_like(x), None, IDENTITY)
    calls = [c for lib in libs for c in lib.calls]
    assert calls, "no launch recorded"
    for name, _, threads, group in calls:
        if "_bwd_" in name and "dinit" not in name:
            assert group == _launch.GROUP and threads % group == 0, (name, threads, group)
        else:
            assert group <= threads, (name, threads, group)
    assert any(group < _launch.GROUP for _, _, _, group in calls), "no small grid was launched"


def test_a_kernel_whose_pipeline_fails_at_first_use_falls_back_before_touching_the_state(monkeypatch):
    _record(monkeypatch, unbuildable={"short_conv_update_float_w4"})
    with pytest.warns(RuntimeWarning, match="Failed to create function state object for: short_conv_update_float_w4"):
        out, want, got_state, want_state = _run_update()
    assert torch.equal(out, want) and torch.equal(got_state, want_state)


def test_a_bad_source_path_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv(_loader.SOURCE_ENV_VAR, str(tmp_path / "missing"))
    x, state, weight = _update_args()
    with pytest.raises(FileNotFoundError, match=_loader.SOURCE_ENV_VAR):
        metal.short_conv_update(x, state, weight, None, None, None, SILU, False)


def test_extra_files_of_a_source_folder_are_compiled_into_every_family(kernel_copy):
    (kernel_copy / "helpers.metal").write_text("inline float cc_extra_helper(float v) { return v; }\n")
    for family in _loader.FAMILIES:
        files = [p.name for p in _loader.source_files(family)]
        assert files[:2] == ["common.metal", "helpers.metal"] and len(files) == 3, files
    _loader.compile_family(CPU, "states")


def test_one_warning_per_broken_family_whatever_op_meets_it(kernel_copy):
    broken = kernel_copy / "states.metal"
    broken.write_text(broken.read_text() + "\nnot metal either;\n")
    x, weight = _fwd_args()
    packed = torch.randn(12, 8)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, _ = metal.causal_conv1d_fwd(x, weight, None, None, None, IDENTITY, True)
        states = metal.causal_conv1d_varlen_states(packed, cu, 3)
    assert len(_fallback_warnings(record)) == 1, _fallback_warnings(record)
    assert torch.equal(out, reference.causal_conv1d_fwd(x, weight, None, None, None, IDENTITY, True)[0])
    assert torch.equal(states, reference.causal_conv1d_varlen_states(packed, cu, 3))
