"""The user-facing benchmark (`python bench.py`, `python -m causal_conv1d_mps.bench`).

One end-to-end run on CPU with `--quick --json` (a subprocess, through the root wrapper, as a
user runs it), whose JSON is checked field by field; then in-process tests of failure
detection, byte counting and argument parsing. No timing is asserted, only that times exist.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import types
from importlib.machinery import ModuleSpec
import subprocess
import sys

import pytest
import torch

import causal_conv1d_mps as ccmps
from causal_conv1d_mps.bench import accuracy, baselines, cli, timing, traffic
from causal_conv1d_mps.bench.cases import build_case
from causal_conv1d_mps.bench.runner import run_case
from causal_conv1d_mps.bench.suites import SUITES, Spec, specs_for

from conftest import REPO_ROOT

HEADER_FIELDS = {
    "device": str, "device_name": str, "dtype": str, "width": int, "suites": list, "quick": bool,
    "torch": str, "causal_conv1d_mps": str, "copy_gbps": float, "time_utc": str, "compile": bool, "cuda_graphs": bool,
}
ROW_FIELDS = {
    "suite": str, "name": str, "op": str, "shape": dict, "width": int, "dtype": str, "flags": dict,
    "bytes": int, "ours_ms": float, "ours_stdev_pct": float, "eager_ms": float, "speedup": float,
    "gbps": float, "pct_copy": float, "rel_err": float, "tolerance": float, "correct": bool,
    "impls": dict, "notes": list,
}


@pytest.fixture(autouse=True)
def default_backend(monkeypatch):
    """The benchmark's own logic is under test here, on the default CPU path (whatever the CI job forces)."""
    monkeypatch.delenv("CAUSAL_CONV1D_BACKEND", raising=False)


def _bench_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CAUSAL_CONV1D_BACKEND"}  # the default CPU path
    # One thread: on a busy shared CI machine, OpenMP's thread hand-offs can cost tens of ms per
    # eager call; this keeps the run to seconds (no timing is asserted).
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python bench.py --quick --device cpu --json FILE` over every suite: (completed process, parsed JSON)."""
    path = tmp_path_factory.mktemp("bench") / "cpu.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench.py"), "--quick", "--device", "cpu", "--dtype", "fp32",
         "--suite", "all", "--json", str(path)],
        cwd=REPO_ROOT, env=_bench_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(path.read_text())


def test_quick_run_header(quick_run):
    _, data = quick_run
    assert data["schema"] == "causal-conv1d-mps-bench/1"
    header = data["header"]
    for field, kind in HEADER_FIELDS.items():
        found = header.get(field)
        assert isinstance(found, kind), f"header[{field!r}] = {found!r}, expected {kind.__name__}"
    assert header["device"] == "cpu" and header["dtype"] == "float32" and header["quick"] is True
    assert header["suites"] == list(SUITES)
    assert header["copy_gbps"] > 0


def test_quick_run_rows(quick_run):
    _, data = quick_run
    rows = data["rows"]
    expected = specs_for(list(SUITES), 4, quick=True)
    assert [r["name"] for r in rows] == [s.name for s in expected]
    assert {r["suite"] for r in rows} == set(SUITES)
    for row in rows:
        for field, kind in ROW_FIELDS.items():
            found = row.get(field)
            assert isinstance(found, kind), f"{row['name']}: {field} = {found!r}, expected {kind.__name__}"
        assert row["correct"], f"{row['name']}: rel err {row['rel_err']}, notes {row['notes']}"
        assert row["rel_err"] <= row["tolerance"] == 1e-5, row["name"]
        assert row["ours_ms"] > 0 and row["eager_ms"] > 0 and math.isfinite(row["speedup"]), row["name"]
        assert row["impls"]["eager"]["ok"], f"{row['name']}: eager baseline disagrees with the oracle"


def test_quick_run_table(quick_run):
    proc, data = quick_run
    lines = proc.stdout.splitlines()
    assert any(line.startswith("copy bandwidth:") for line in lines)
    table = [line for line in lines if line.startswith("| ")]
    assert len(table) == 1 + len(data["rows"]), "one table line per row plus the column names"
    assert f"{len(data['rows'])} rows, all verified" in proc.stdout


def test_module_entry_point(monkeypatch, capsys):
    """`python -m causal_conv1d_mps.bench --help` (in process: the subprocess run covers bench.py)."""
    monkeypatch.setattr(sys, "argv", ["causal_conv1d_mps.bench", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("causal_conv1d_mps.bench", run_name="__main__")
    assert exc.value.code == 0
    assert "--dtype" in capsys.readouterr().out


@pytest.fixture
def one_thread():
    """In-process runs: one intra-op thread, as `_bench_env` gives the subprocess."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_wrong_result_fails_the_row_and_the_exit_code(monkeypatch, tmp_path, capsys, one_thread):
    real = ccmps.causal_conv1d

    def off_by_a_little(*args, **kwargs):
        return real(*args, **kwargs) * (1 + 1e-3)

    monkeypatch.setattr(ccmps, "causal_conv1d", off_by_a_little)
    path = tmp_path / "fail.json"
    code = cli.main(["--quick", "--device", "cpu", "--dtype", "fp32", "--suite", "basic", "--json", str(path)])
    assert code == 1
    rows = json.loads(path.read_text())["rows"]
    assert rows and not any(r["correct"] for r in rows)
    assert all(r["impls"]["eager"]["ok"] for r in rows), "only ours was perturbed"
    assert "FAIL" in capsys.readouterr().out


def test_decode_state_must_be_exact(monkeypatch):
    real = ccmps.short_conv_update

    def leaves_state_behind(x, conv_state, *args, **kwargs):
        out = real(x, conv_state, *args, **kwargs)
        conv_state[..., -1] = conv_state[..., -1] * (1 + 2**-10)  # wrong in the last bits only
        return out

    monkeypatch.setattr(ccmps, "short_conv_update", leaves_state_behind)
    spec = Spec("decode", "short_conv_update", "decode", 2, 16)
    case = build_case(spec, torch.float32, torch.device("cpu"), ccmps, [])
    inputs = case.make_inputs()
    before = {k: v.clone() for k, v in inputs.items()}
    verdict = accuracy.check(case, before, case.wrap(case.ours)(inputs))
    assert not verdict.exact_ok and not verdict.ok


@pytest.mark.parametrize("op,backward",
                         [("causal_conv1d", False), ("short_conv_fused", False), ("short_conv_fused", True)])
def test_chunked_check_matches_one_block(monkeypatch, op, backward):
    """Checking channel block by channel block gives the error of one whole-tensor check."""
    spec = Spec("t", op, "t", 2, 24, 19, width=3, mask=op == "short_conv_fused", backward=backward)
    case = build_case(spec, torch.bfloat16, torch.device("cpu"), ccmps, [])
    inputs = case.make_inputs()
    results = case.wrap(case.ours)(inputs)
    whole = accuracy.check(case, inputs, results)
    monkeypatch.setattr(accuracy, "BLOCK_ELEMENTS", 1)  # one channel per block
    blocked = accuracy.check(case, inputs, results)
    assert whole.ok and blocked.ok
    assert blocked.rel_err == pytest.approx(whole.rel_err, rel=1e-9)
    assert whole.rel_err > 0, "bf16 results cannot match float64 exactly: the check must see the difference"


def _install_fake_dao(monkeypatch, **functions):
    module = types.ModuleType("causal_conv1d")
    module.__spec__ = ModuleSpec("causal_conv1d", None)
    module.__version__ = "0.0-fake"
    for name, fn in functions.items():
        setattr(module, name, fn)
    monkeypatch.setitem(sys.modules, "causal_conv1d", module)


def test_thirdparty_column_is_verified_before_it_is_timed(monkeypatch, one_thread):
    """A stand-in for Dao-AILab causal_conv1d: right forward, wrong decode step (no time reported)."""
    def conv(x, weight, bias=None, activation=None):
        return baselines.eager_causal_conv1d(x, weight, bias, activation == "silu")

    def update(x, conv_state, weight, bias=None, activation=None):
        return torch.zeros_like(x)

    _install_fake_dao(monkeypatch, causal_conv1d_fn=conv, causal_conv1d_update=update)
    libs, unusable = baselines.thirdparty(torch.device("cuda"))  # the device only gates the import
    assert [lib.name for lib in libs] == ["dao"] and not unusable
    cpu = torch.device("cpu")
    good = run_case(build_case(Spec("t", "causal_conv1d", "t", 2, 8, 16), torch.float32, cpu, ccmps, libs),
                    timing.QUICK, 0, 1.0, compile_eager=False)
    assert good["impls"]["dao"]["ok"] and good["impls"]["dao"]["ms"] > 0 and good["correct"]
    bad = run_case(build_case(Spec("t", "short_conv_update", "t", 2, 8), torch.float32, cpu, ccmps, libs),
                   timing.QUICK, 0, 1.0, compile_eager=False)
    assert bad["impls"]["dao"]["ok"] is False and bad["impls"]["dao"]["ms"] is None
    assert bad["correct"], "a wrong third-party result does not fail our row"
    assert any(n.startswith("dao: wrong result") for n in bad["notes"])


def test_broken_thirdparty_install_is_reported_not_fatal(monkeypatch):
    _install_fake_dao(monkeypatch)  # installed, but without causal_conv1d_fn
    libs, unusable = baselines.thirdparty(torch.device("cuda"))
    assert "dao" not in [lib.name for lib in libs]
    assert "AttributeError" in unusable["dao"]
    assert baselines.thirdparty(torch.device("cpu")) == ([], {}), "CUDA-only libraries are not tried elsewhere"


def test_fla_found_under_its_0_6_module_path(monkeypatch, one_thread):
    """fla-core 0.6 keeps causal_conv1d in `fla.modules.causal_conv1d` and has no `__version__`."""
    calls = []

    def fla_conv(x, weight=None, bias=None, residual=None, activation=None, **kwargs):
        calls.append(x.shape)
        out = baselines.eager_causal_conv1d(x.transpose(1, 2), weight, bias, activation == "silu").transpose(1, 2)
        return (out if residual is None else out + residual), None

    modules = {}
    for name in ("fla", "fla.modules", "fla.modules.causal_conv1d"):
        modules[name] = types.ModuleType(name)
        modules[name].__spec__ = ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, modules[name])
    modules["fla.modules.causal_conv1d"].causal_conv1d = fla_conv
    monkeypatch.setattr(baselines.importlib.metadata, "version",
                        lambda dist: "0.6-fake" if dist == "fla-core" else (_ for _ in ()).throw(
                            baselines.importlib.metadata.PackageNotFoundError(dist)))
    libs, unusable = baselines.thirdparty(torch.device("cuda"))
    assert [lib.name for lib in libs] == ["fla"] and not unusable
    assert libs[0].version == "0.6-fake"
    row = run_case(build_case(Spec("t", "short_conv_fused", "t", 2, 8, 16), torch.float32, torch.device("cpu"),
                              ccmps, libs), timing.QUICK, 0, 1.0, compile_eager=False)
    assert row["impls"]["fla"]["ok"] and row["impls"]["fla"]["ms"] > 0 and calls


def test_byte_counts_follow_perf_md():
    assert traffic.forward_bytes(4, 8192, 4096, 2) == 2 * 4 * 8192 * 4096 * 2 == 536_870_912
    assert traffic.forward_backward_bytes(8, 2048, 4096, 2) == 5 * 8 * 2048 * 4096 * 2
    assert traffic.decode_bytes(256, 8192, 4, 2) == (2 * 256 * 8192 + 2 * 256 * 8192 * 3) * 2 == 33_554_432
    assert traffic.mask_bytes(4, 8192, 8) == 4 * 8192 * 8
    assert traffic.copy_bytes(1000, 4) == 8000


def test_case_bytes_per_op():
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    fwd = build_case(Spec("s", "causal_conv1d", "l", 2, 64, 128), bf16, cpu, ccmps, [])
    assert fwd.bytes == 2 * 2 * 64 * 128 * 2
    masked = build_case(Spec("s", "short_conv_fused", "l", 2, 64, 128, mask=True), bf16, cpu, ccmps, [])
    assert masked.bytes == 2 * 2 * 128 * 64 * 2 + 2 * 128 * 8  # plus the int64 mask
    sliced = build_case(Spec("s", "short_conv_fused", "l", 2, 64, 128, row_stride=96), bf16, cpu, ccmps, [])
    assert sliced.bytes == 2 * 2 * 128 * 64 * 2, "a slice moves only its own columns"
    assert sliced.make_inputs()["x"].stride() == (128 * 96, 96, 1)
    both = build_case(Spec("s", "causal_conv1d", "l", 2, 64, 128, backward=True), bf16, cpu, ccmps, [])
    assert both.bytes == 5 * 2 * 64 * 128 * 2
    step = build_case(Spec("s", "short_conv_update", "l", 3, 64, width=5), torch.float32, cpu, ccmps, [])
    assert step.bytes == (2 * 3 * 64 + 2 * 3 * 64 * 4) * 4


@pytest.mark.parametrize("text,dtype", [("fp32", torch.float32), ("float32", torch.float32), ("bf16", torch.bfloat16),
                                        ("bfloat16", torch.bfloat16), ("FP16", torch.float16), ("half", torch.float16),
                                        ("torch.float16", torch.float16)])
def test_dtype_spellings(text, dtype):
    assert cli.parse_args(["--dtype", text]).dtype == dtype


def test_defaults():
    args = cli.parse_args([])
    assert (args.device, args.dtype, args.width, args.quick, args.compile) == ("auto", torch.bfloat16, 4, False, False)
    assert args.suite == list(SUITES) and args.json is None and args.plot is None


def test_suite_lists():
    assert cli.parse_args(["--suite", "all"]).suite == list(SUITES)
    assert cli.parse_args(["--suite", "decode, basic,decode"]).suite == ["decode", "basic"]


@pytest.mark.parametrize("argv", [["--suite", "fast"], ["--suite", "basic,nope"], ["--suite", ""], ["--dtype", "int8"],
                                  ["--width", "0"], ["--width", "four"], ["--device", "tpu"]])
def test_bad_arguments_exit_2_and_say_what_was_expected(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    assert "expected" in capsys.readouterr().err


def test_width_option_reaches_every_suite_but_the_sweep():
    specs = specs_for(list(SUITES), 7, quick=True)
    assert {s.width for s in specs if s.suite != "width"} == {7}
    assert {s.width for s in specs if s.suite == "width"} == {2, 3, 8, 16}


def test_plot_is_written(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    from causal_conv1d_mps.bench import report

    _, data = quick_run
    report.write_plot(str(tmp_path / "plot.png"), data["header"], data["rows"])
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_plot_without_matplotlib_is_a_clear_error(capsys):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert cli.main(["--quick", "--device", "cpu", "--plot", "x.png"]) == 2
        assert "matplotlib" in capsys.readouterr().err
    else:
        pytest.skip("matplotlib is installed here")


def test_a_row_that_cannot_allocate_is_reported_not_fatal(monkeypatch):
    case = build_case(Spec("t", "causal_conv1d", "t", 1, 4, 8), torch.float32, torch.device("cpu"), ccmps, [])

    def out_of_memory():
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(case, "make_inputs", out_of_memory)
    record = run_case(case, timing.QUICK, 0, 1.0, compile_eager=False)
    assert not record["correct"] and record["ours_ms"] is None
    assert "inputs could not be allocated" in record["notes"][0]


def test_cuda_graphs_need_a_cuda_device(capsys):
    assert cli.main(["--quick", "--device", "cpu", "--cuda-graphs"]) == 2
    err = capsys.readouterr().err
    assert "--cuda-graphs" in err and "expected a CUDA device, got cpu" in err


def test_a_failed_graph_capture_is_reported_not_fatal(monkeypatch, one_thread):
    """An implementation that cannot be captured keeps its verdict and gets no time; the row goes on."""
    case = build_case(Spec("t", "causal_conv1d", "t", 1, 4, 8), torch.float32, torch.device("cpu"), ccmps, [])
    captured = []

    def capture_fails(call, sets, device):
        captured.append(len(sets))
        raise RuntimeError("operation not permitted when stream is capturing (simulated)")

    monkeypatch.setattr(timing, "graph_replays", capture_fails)
    record = run_case(case, timing.QUICK, 0, 1.0, compile_eager=False, cuda_graphs=True)
    assert captured, "the timing went through graph capture"
    assert record["correct"] and record["ours_ms"] is None and record["eager_ms"] is None
    assert any("ours: CUDA graph capture failed" in note for note in record["notes"])


def test_a_graph_replay_is_timed_per_call_it_holds(monkeypatch, one_thread):
    """One replay of the graph makes one call per input set: its time is divided by those calls (the replay's
    own launch cost spread over them, as over the layers of a model's captured step)."""
    case = build_case(Spec("t", "causal_conv1d", "t", 1, 4, 8), torch.float32, torch.device("cpu"), ccmps, [])
    monkeypatch.setattr(timing, "graph_replays", lambda call, sets, device: (lambda graph: None, ["graph"], 8))
    monkeypatch.setattr(timing, "measure", lambda call, sets, device, plan: timing.Timing(4e-3, 1.0, 3, 2))
    record = run_case(case, timing.QUICK, 0, 1.0, compile_eager=False, cuda_graphs=True)
    assert record["ours_ms"] == pytest.approx(0.5) and record["eager_ms"] == pytest.approx(0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need an NVIDIA GPU")
def test_cuda_graph_replays_time_every_suite_kind(tmp_path):
    """Forward, forward + backward and decode rows (in-place state updates) are captured, verified and timed."""
    path = tmp_path / "graphs.json"
    code = cli.main(["--quick", "--device", "cuda", "--dtype", "bf16", "--suite", "large,backward,decode",
                     "--cuda-graphs", "--json", str(path)])
    run = json.loads(path.read_text())
    assert code == 0 and run["header"]["cuda_graphs"] is True
    for row in run["rows"]:
        assert row["correct"] and row["ours_ms"] and row["eager_ms"], row["name"]
        assert not any("capture failed" in note and note.startswith(("ours", "eager")) for note in row["notes"])
