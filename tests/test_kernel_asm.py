"""`benchmarks/kernel_asm.py` (PTX/SASS counts without a GPU) keeps compiling the package's kernels."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("triton")


@pytest.mark.parametrize("args", [
    ["update", "--BD", "256"],
    ["fwd", "--BT", "8", "--BD", "128", "--warps", "1"],
    # the run-based backward with the channel-last W = 4 tiles it is dispatched with (`_config`)
    ["bwd_runs", "--BT", "4", "--BD", "128", "--R", "4", "--HR", "4", "--carry", "--vec", "4", "--warps", "1"],
], ids=["update", "fwd", "bwd_runs"])
def test_counts_instructions_of_a_compiled_kernel(args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_asm.py"), *args],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    ptx = re.search(r"PTX : \{'instructions': (\d+).*'global_loads': (\d+)", run.stdout)
    assert ptx, run.stdout
    assert int(ptx.group(1)) > 50 and int(ptx.group(2)) > 0, run.stdout
    assert "SASS:" in run.stdout


@pytest.mark.parametrize("name,cases", [("sliding_window_fwd", 4), ("sliding_window_bwd", 3)])
def test_sliding_window_prototypes_match_the_reference(name, cases):
    """`benchmarks/prototypes/` (a design lead, docs/PERF_NOTES.md) stays correct under the interpreter."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prototypes" / f"{name}.py")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.count("relative error") == cases, run.stdout
