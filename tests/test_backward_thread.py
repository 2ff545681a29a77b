"""`benchmarks/backward_thread.py` on CPU: its table's structure, the backward-body timer, and the restore."""

from __future__ import annotations

import importlib.util
import re

from conftest import REPO_ROOT


def _script():
    spec = importlib.util.spec_from_file_location("backward_thread", REPO_ROOT / "benchmarks" / "backward_thread.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_it_times_the_package_backward_body_on_both_engine_modes_and_restores_it(capsys):
    from causal_conv1d_mps import ops

    original = ops._CausalConv1dEager.backward
    assert _script().main(["--device", "cpu", "--calls", "2", "--repeats", "1", "--rounds", "1"]) == 0
    assert ops._CausalConv1dEager.backward is original
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^  (.+?)\s+[\d.]+ us   backward body\s+([\d.]+) us$", out, re.MULTILINE))
    assert out.count("engine multithreading") == 2
    assert float(rows["package fwd+bwd, bias"]) > 0  # the body timer saw the package's backward
    assert float(rows["eager fwd+bwd, bias"]) == 0  # and nothing of eager's
    assert "the calling thread among them: True" in out
