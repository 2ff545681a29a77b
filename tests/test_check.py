"""The self-check users run first (`python -m causal_conv1d_mps.check`).

End-to-end runs on CPU as a user runs them (subprocesses): the reference path with numpy, pytest and
hypothesis made unimportable (the check needs only torch), the Triton kernels in the interpreter and the
Metal kernels through the Linux harness (each skipped, with the reason, where it cannot run); the JSON
is checked field by field. Then in-process runs with faults injected: a wrong result must make the exit
status 1, and a fallback to the reference path (of every op, or of one op, or after a failed compile)
must be reported while the exit status stays 0. No timing is asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from causal_conv1d_mps import _backend, reference
from causal_conv1d_mps.check import cli, report, serving
from causal_conv1d_mps.check.cases import CASES, WIDTHS

from conftest import REPO_ROOT

# Every public op, by the function a user calls.
OPS = {"causal_conv1d", "short_conv_fused", "short_conv_update", "causal_conv1d_update", "causal_conv1d_varlen_states"}
DTYPES = {"float32", "float16", "bfloat16"}
ENV_FIELDS = {
    "device": str, "device_name": str, "os": str, "python": str, "torch": str, "causal_conv1d_mps": str,
    "package_path": str, "backend": str, "backend_default": str, "backend_forced": bool, "dtypes": dict,
    "quick": bool, "seed": int, "timing": bool, "time_utc": str,
}
COMPILE_FIELDS = {"name": str, "how": str, "ok": bool, "warnings": list}
ACCURACY_FIELDS = {
    "op": str, "case": str, "dtype": str, "width": int, "shape": str, "tolerance": float, "ok": bool,
    "rel_err": float, "worst": str, "outputs": dict, "served_by": str, "fallback": bool, "warnings": list,
}
TIMING_FIELDS = {
    "name": str, "op": str, "shape": dict, "width": int, "dtype": str, "ours_ms": float, "eager_ms": float,
    "speedup": float, "correct": bool, "served_by": str, "fallback": bool, "notes": list,
}
SUMMARY_FIELDS = {
    "passed": bool, "accuracy_checks": int, "accuracy_failures": int, "timing_failures": int, "ops": dict,
    "fallback_ops": list, "compile_failures": list, "exit_status": int,
}
# Makes the named modules unimportable, then runs the check as `python -m` would.
WITHOUT_TEST_EXTRAS = (
    "import runpy, sys\n"
    "for name in ('numpy', 'pytest', 'hypothesis'):\n"
    "    sys.modules[name] = None\n"
    "sys.argv = ['causal_conv1d_mps.check'] + sys.argv[1:]\n"
    "runpy.run_module('causal_conv1d_mps.check', run_name='__main__', alter_sys=True)\n"
)


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch):
    """The check chooses the backend itself (whatever the CI job forces), and leaves no cached choice behind."""
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    _backend.clear_cache()
    yield
    _backend.clear_cache()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != _backend.ENV_VAR}
    env["OMP_NUM_THREADS"] = "1"  # a busy shared CI machine: steadier and faster eager calls
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(tmp_path, *args: str, program: list[str] | None = None, extra_env: dict | None = None, device="cpu"):
    path = tmp_path / "check.json"
    command = program or [sys.executable, "-m", "causal_conv1d_mps.check"]
    done = subprocess.run(command + ["--device", device, "--quick", "--json", str(path), *args],
                          capture_output=True, text=True, env={**_env(), **(extra_env or {})}, timeout=600,
                          cwd=REPO_ROOT)
    document = json.loads(path.read_text()) if path.exists() else None
    return done, document


def _check_fields(record: dict, fields: dict, where: str) -> None:
    for name, kind in fields.items():
        assert name in record, f"{where}: no field {name!r}"
        value = record[name]
        if kind is float:
            assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}.{name}: {value!r}"
        else:
            assert isinstance(value, kind), f"{where}.{name}: expected {kind.__name__}, got {value!r}"


def _check_document(document: dict, backend: str, device: str = "cpu") -> None:
    """The JSON a user shares: every section and field, every op and dtype checked, served by `backend`."""
    assert document["schema"] == report.SCHEMA
    env = document["environment"]
    _check_fields(env, ENV_FIELDS, "environment")
    assert env["device"] == device and env["backend"] == backend and env["quick"] is True
    assert set(env["dtypes"]) == DTYPES and all(d["served_by"] == backend for d in env["dtypes"].values())
    for i, entry in enumerate(document["compile"]):
        _check_fields(entry, COMPILE_FIELDS, f"compile[{i}]")
        assert entry["ok"], entry
    accuracy = document["accuracy"]
    for i, r in enumerate(accuracy):
        _check_fields(r, ACCURACY_FIELDS, f"accuracy[{i}]")
        assert r["ok"] and r["error"] is None, r
        # filters wider than the Triton kernels take go to the reference path by design (varlen states: no filter)
        routed = serving.reference_by_design(backend, r["width"]) and r["op"] != "causal_conv1d_varlen_states"
        expected = "reference" if routed else backend
        assert r["served_by"] == expected and not r["fallback"], r
        assert r["tolerance"] == {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}[r["dtype"]]
        for name, g in r["outputs"].items():
            assert g["ok"] and (g["exact"] or g["rel_err"] <= r["tolerance"]), (name, r)
    assert {r["op"] for r in accuracy} == OPS
    assert {(r["op"], r["dtype"]) for r in accuracy} == {(op, d) for op in OPS for d in DTYPES}
    assert {r["width"] for r in accuracy} == set(WIDTHS)
    assert {r["case"] for r in accuracy} == {c.label for c in CASES}
    timing = document["timing"]
    assert {t["op"] for t in timing} == {"causal_conv1d", "short_conv_fused", "short_conv_update"}
    assert any(t["backward"] for t in timing)
    for i, t in enumerate(timing):
        _check_fields(t, TIMING_FIELDS, f"timing[{i}]")
        assert t["correct"] and t["served_by"] == backend and not t["fallback"], t
        assert t["ours_ms"] > 0 and t["eager_ms"] > 0 and math.isclose(t["speedup"], t["eager_ms"] / t["ours_ms"])
    summary = document["summary"]
    _check_fields(summary, SUMMARY_FIELDS, "summary")
    assert summary["passed"] and summary["exit_status"] == 0
    assert summary["accuracy_checks"] == len(accuracy) and summary["accuracy_failures"] == 0
    assert summary["fallback_ops"] == [] and summary["compile_failures"] == []
    assert set(summary["ops"]) == OPS


# ---------------------------------------------------------------------------------------------------------
# End-to-end, as a user runs it


def test_reference_run_needs_only_torch(tmp_path):
    """The default CPU run, with numpy, pytest and hypothesis unimportable: exit 0, a complete JSON."""
    done, document = _run(tmp_path, program=[sys.executable, "-c", WITHOUT_TEST_EXTRAS])
    assert done.returncode == 0, done.stdout + done.stderr
    assert document is not None, done.stderr
    _check_document(document, "reference")
    assert "result: PASS" in done.stdout and "FALLBACK" not in done.stdout
    assert document["compile"] == [] and "nothing to compile" in done.stdout


def test_triton_interpreter_run(tmp_path):
    reason = _backend.backend_unavailable_reason("triton", torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"triton on cpu: {reason}")
    done, document = _run(tmp_path, "--backend", "triton", extra_env={"TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    _check_document(document, "triton")
    assert [e["how"] for e in document["compile"]] == ["first call"] * 6


def test_metal_harness_run(tmp_path):
    reason = _backend.backend_unavailable_reason("metal", torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"metal on cpu: {reason}")
    done, document = _run(tmp_path, "--backend", "metal")
    assert done.returncode == 0, done.stdout + done.stderr
    _check_document(document, "metal")
    assert document["compile"], "the Metal kernels were not compiled"


def test_gpu_run(tmp_path, device):
    """`pytest --device cuda` or `--device mps`: the check on the GPU with its default backend, every dtype
    served by the kernels (on a Mac before macOS 14, bfloat16 is reported as not served instead)."""
    if device.type == "cpu":
        pytest.skip("the CPU runs are the tests above; this one runs with --device cuda or --device mps")
    backend = {"cuda": "triton", "mps": "metal"}[device.type]
    done, document = _run(tmp_path, device=device.type)
    assert done.returncode == 0, done.stdout + done.stderr
    served = {name: d["served_by"] for name, d in document["environment"]["dtypes"].items()}
    if served.get("bfloat16") != backend:
        pytest.skip(f"bfloat16 is not served by {backend} here: {document['environment']['dtypes']['bfloat16']}")
    _check_document(document, backend, device.type)


# ---------------------------------------------------------------------------------------------------------
# Faults injected in-process (reference speed, no compiler needed)


def _main(tmp_path, capsys, *args: str) -> tuple[int, dict, str]:
    path = tmp_path / "check.json"
    status = cli.main(["--device", "cpu", "--quick", "--no-timing", "--json", str(path), *args])
    return status, json.loads(path.read_text()), capsys.readouterr().out


class _Perturbing:
    """A backend module whose function `name` is replaced by `wrong(real function)`."""

    def __init__(self, module, name, wrong):
        self._module, self._name, self._wrong = module, name, wrong

    def __getattr__(self, attr):
        fn = getattr(self._module, attr)
        return self._wrong(fn) if attr == self._name else fn


@pytest.fixture(autouse=True)
def _fresh_backend_choices():
    """The api keeps the backend chosen for a known call signature: forget the ones made here (a perturbed
    module among them) once the test and its monkeypatching are done."""
    yield
    _backend.clear_cache()


def _inject(monkeypatch, name, wrong):
    real_select = _backend.select
    monkeypatch.setattr(_backend, "select", lambda device, dtype: _Perturbing(real_select(device, dtype), name, wrong))
    _backend.clear_cache()  # signatures seen before would skip `select`: choose again, through the perturbation


def _scaled_output(fn):
    def wrong(*args):
        out, final = fn(*args)
        return out * 1.05, final  # 5% off: beyond every dtype's tolerance
    return wrong


def _state_one_ulp_off(fn):
    def wrong(x, conv_state, *args):
        out = fn(x, conv_state, *args)
        if conv_state.dtype == torch.float32:  # far below the float32 tolerance: only the exact check sees it
            conv_state.copy_(torch.nextafter(conv_state, torch.full_like(conv_state, math.inf)))
        return out
    return wrong


def test_wrong_output_fails(tmp_path, capsys, monkeypatch):
    _inject(monkeypatch, "short_conv_fused_fwd", _scaled_output)
    status, document, out = _main(tmp_path, capsys)
    assert status == 1
    failed = [r for r in document["accuracy"] if not r["ok"]]
    assert {r["op"] for r in failed} >= {"short_conv_fused"}
    assert all(r["ok"] for r in document["accuracy"] if r["op"] in ("causal_conv1d", "causal_conv1d_varlen_states"))
    assert all(r["outputs"]["out"]["rel_err"] > r["tolerance"] for r in failed if r["op"] == "short_conv_fused")
    summary = document["summary"]
    assert not summary["passed"] and summary["exit_status"] == 1 and summary["accuracy_failures"] == len(failed)
    assert "result: FAIL" in out and "FAIL short_conv_fused [" in out


def test_decode_state_must_be_bit_exact(tmp_path, capsys, monkeypatch):
    _inject(monkeypatch, "short_conv_update", _state_one_ulp_off)
    status, document, out = _main(tmp_path, capsys)
    assert status == 1
    failed = [r for r in document["accuracy"] if not r["ok"]]
    assert failed and {r["dtype"] for r in failed} == {"float32"}
    assert {r["op"] for r in failed} == {"short_conv_update", "causal_conv1d_update"}
    for r in failed:
        state = r["outputs"]["state"]
        assert state["exact"] and not state["ok"] and state["rel_err"] < r["tolerance"]
    assert "state not bit-exact" in out


def _raising(fn):
    def broken(*args):
        raise RuntimeError("injected: kernel short_conv_update_float_w4 not found\n  more detail")
    return broken


def test_op_that_raises_fails_once_per_error(tmp_path, capsys, monkeypatch):
    """A call that raises is a failed check; the text gives one line per op and error, the JSON every check."""
    _inject(monkeypatch, "short_conv_update", _raising)
    status, document, out = _main(tmp_path, capsys)
    assert status == 1
    failed = [r for r in document["accuracy"] if not r["ok"]]
    assert {r["op"] for r in failed} == {"short_conv_update", "causal_conv1d_update"}
    assert all(r["error"] == "RuntimeError: injected: kernel short_conv_update_float_w4 not found" for r in failed)
    fail_lines = [line for line in out.splitlines() if line.startswith("  FAIL ")]
    assert len(fail_lines) == 2, fail_lines
    decode = sum(r["op"] == "short_conv_update" for r in failed)
    assert any(f"and {decode - 1} more checks of short_conv_update" in line for line in fail_lines)


def test_fallback_of_every_op_is_reported(tmp_path, capsys, monkeypatch):
    """A kernel backend that cannot run here: every call is served by the reference path, flagged, exit 0."""
    import causal_conv1d_mps.metal as metal

    monkeypatch.setattr(metal, "unsupported_reason", lambda device, dtype: "injected: no Metal compiler here")
    status, document, out = _main(tmp_path, capsys, "--backend", "metal")
    assert status == 0
    assert all(r["ok"] and r["fallback"] and r["served_by"] == "reference" for r in document["accuracy"])
    assert any("injected: no Metal compiler here" in w for r in document["accuracy"] for w in r["warnings"])
    assert document["environment"]["backend_unavailable"] == "injected: no Metal compiler here"
    assert set(document["summary"]["fallback_ops"]) == OPS
    assert "WARNING: these ops fell back to the reference path" in out and "result: PASS" in out


def _fake_metal(monkeypatch, falling_back: str, seen_by: str = "call"):
    """`causal_conv1d_mps.metal` replaced by the reference functions (as if they were kernels), except that
    `falling_back` hands its calls to the reference path, as a failed compile makes it do. `seen_by`: how
    the fallback shows: a call into the reference module (with a warning that does not say so), or only
    a warning naming the reference path (the function it runs was bound before the check could see it)."""
    import causal_conv1d_mps.metal as metal

    monkeypatch.setattr(metal, "unsupported_reason", lambda device, dtype: None)
    for name in serving.BACKEND_FUNCTIONS:
        monkeypatch.setattr(metal, name, getattr(reference, name))  # bound now: not seen as reference calls
    bound = getattr(reference, falling_back)

    def fallback(*args):
        if seen_by == "call":
            warnings.warn("injected: this family failed to compile", RuntimeWarning)
            return getattr(reference, falling_back)(*args)
        warnings.warn("injected: compile failed; using the PyTorch reference path instead", RuntimeWarning)
        return bound(*args)

    monkeypatch.setattr(metal, falling_back, fallback)


@pytest.mark.parametrize("seen_by", ["call", "warning"])
def test_fallback_of_one_op_is_reported(tmp_path, capsys, monkeypatch, seen_by):
    _fake_metal(monkeypatch, "short_conv_update", seen_by)
    status, document, out = _main(tmp_path, capsys, "--backend", "metal")
    assert status == 0
    fell_back = {r["op"] for r in document["accuracy"] if r["fallback"]}
    assert fell_back == {"short_conv_update", "causal_conv1d_update"}  # both decode ops use that function
    for r in document["accuracy"]:
        assert r["served_by"] == ("reference" if r["op"] in fell_back else "metal"), r
        assert r["ok"]
    assert document["summary"]["fallback_ops"] == ["causal_conv1d_update", "short_conv_update"]
    decode = [r for r in document["accuracy"] if r["op"] == "short_conv_update"]
    assert all("injected: " in " ".join(r["warnings"]) for r in decode)
    assert "FALLBACK to reference" in out


def test_failed_compile_is_reported_and_the_check_goes_on(tmp_path, capsys, monkeypatch):
    """Per-family compilation (when the Metal loader offers it): a failure quotes the first error line."""
    from causal_conv1d_mps.metal import _loader

    _fake_metal(monkeypatch, "short_conv_fused_fwd")
    compiled = []

    def compile_family(device, family):
        compiled.append((device.type, family))
        if family == "short_conv_fused":
            raise RuntimeError("kernels.metal:12:5: error: injected compile error\n  more compiler output\n")

    monkeypatch.setattr(_loader, "FAMILIES", ("causal_conv1d", "short_conv_fused", "short_conv_update"), raising=False)
    monkeypatch.setattr(_loader, "compile_family", compile_family, raising=False)
    status, document, out = _main(tmp_path, capsys, "--backend", "metal")
    assert status == 0
    assert compiled == [("cpu", "causal_conv1d"), ("cpu", "short_conv_fused"), ("cpu", "short_conv_update")]
    entries = {e["name"]: e for e in document["compile"]}
    assert [e["how"] for e in document["compile"]] == ["compile_family"] * 3
    assert entries["causal_conv1d"]["ok"] and entries["short_conv_update"]["ok"]
    assert not entries["short_conv_fused"]["ok"]
    assert entries["short_conv_fused"]["error"] == "RuntimeError: kernels.metal:12:5: error: injected compile error"
    assert document["summary"]["compile_failures"] == ["short_conv_fused"]
    assert "short_conv_fused" in document["summary"]["fallback_ops"]
    assert "FAILED: RuntimeError: kernels.metal:12:5: error: injected compile error" in out
    assert "more compiler output" not in out


def test_usage_errors_exit_2(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        cli.main(["--backend", "cuda"])
    assert e.value.code == 2
    monkeypatch.setenv(_backend.ENV_VAR, "vulkan")
    assert cli.main(["--device", "cpu", "--no-timing"]) == 2
    assert "CAUSAL_CONV1D_BACKEND: expected one of reference, triton, metal, got 'vulkan'" in capsys.readouterr().err
    monkeypatch.delenv(_backend.ENV_VAR)
    if not torch.cuda.is_available():
        assert cli.main(["--device", "cuda", "--no-timing"]) == 2
        assert "--device cuda" in capsys.readouterr().err


def test_wide_filters_on_triton_are_reference_by_design_not_fallbacks():
    """The Triton backend hands filters wider than its `MAX_WIDTH` to the reference path on purpose: the check
    reports those calls as served by the reference path, not as fallbacks; at a width it serves, a call into
    the reference path is still a fallback."""
    from causal_conv1d_mps import triton as triton_backend

    wide, narrow = triton_backend.MAX_WIDTH + 1, triton_backend.MAX_WIDTH
    x = torch.randn(1, 2, 5)
    for width, by_design in ((wide, True), (narrow, False)):
        with serving.watch("triton", width) as served:
            reference.causal_conv1d_fwd(x, torch.randn(2, width), None, None, None, 0, False)
        assert served.served_by == "reference" and served.fell_back is not by_design, (width, served)
    with serving.watch("triton", wide) as served:
        pass  # no reference call (e.g. varlen states, which take no filter): the backend served it
    assert served.served_by == "triton" and not served.fell_back
    assert not serving.reference_by_design("metal", 257) and not serving.reference_by_design("triton", None)
