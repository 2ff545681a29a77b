"""Shared test harness: the backend and device fixtures, shapes, tolerances, input builders.

Every op test takes the `backend` fixture, which forces one backend through
`CAUSAL_CONV1D_BACKEND` (docs/CONTRACT.md section 1) and skips, with the reason, where that backend cannot run.
`--device` (default `cpu`) picks the device of the test tensors: on CPU the `triton`
parametrisation runs the Triton kernels in the interpreter and `metal` runs the shipped
`.metal` sources through the Linux harness, both slow per element, so their shapes are small.

Select backends with markers: `-m reference`, `-m triton`, `-m metal`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("causal_conv1d_mps") is None:  # a source checkout, not installed
    sys.path.insert(0, str(REPO_ROOT))

BACKENDS = ("reference", "triton", "metal")
KERNEL_BACKENDS = ("triton", "metal")

# docs/CONTRACT.md section 6: relative Frobenius error against float64, for outputs and every gradient.
TOLERANCE = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
    torch.float64: 1e-12,
}

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WIDTHS = (1, 2, 3, 4, 5, 6, 7, 8, 16)


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        choices=("cpu", "cuda", "mps"),
        help="device of the test tensors (default cpu; cuda or mps on GPU machines)",
    )
    parser.addoption(
        "--shard",
        default=None,
        type=parse_shard,
        metavar="K/N",
        help="run only the K-th of N interleaved parts of the collected tests (a long GPU suite over N calls)",
    )


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard`'s `K/N` as (K, N), with 1 <= K <= N."""
    part, _, parts = text.partition("/")
    if not (part.isdigit() and parts.isdigit() and 1 <= int(part) <= int(parts)):
        raise pytest.UsageError(f"--shard: expected K/N with 1 <= K <= N (e.g. 1/2), got {text!r}")
    return int(part), int(parts)


def in_shard(count: int, shard: tuple[int, int]) -> list[int]:
    """Indices of `count` tests, in run order, that shard (K, N) keeps: every N-th from the (K-1)-th, so that
    each part gets its share of the slow tests that `slow_first` puts at the front."""
    part, parts = shard
    return list(range(part - 1, count, parts))


def pytest_configure(config):
    for name in BACKENDS:
        config.addinivalue_line("markers", f"{name}: op tests run through the {name} backend")
    config.addinivalue_line("markers", "slow: long-running, excluded from the quick CI job with -m 'not slow'")
    if config.getoption("--device") == "cpu":
        # Triton reads this when kernels are decorated; set it before the package imports them.
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _device_skip_reason(device: torch.device) -> str | None:
    if device.type == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device here"
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return "--device mps: MPS is not available here"
    return None


def load_prototype(name: str):
    """The module `benchmarks/prototypes/<name>.py`, imported with its folder on `sys.path` (as when it runs
    as a script: the prototypes import each other by name)."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "prototypes"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def spread_worker(worker: str | None, devices: int) -> int | None:
    """The CUDA device index a pytest-xdist worker (`gw<N>`) takes when the machine has several: N modulo
    their count, so `-n` workers spread over every GPU; None for one GPU or outside xdist."""
    if not worker or not worker.startswith("gw") or not worker[2:].isdigit() or devices < 2:
        return None
    return int(worker[2:]) % devices


# The slowest tests of the whole suite on 2 H200s (`--durations`, docs/results/h200-gpu-suite-session10.log): NCCL
# and gloo process groups, the self-check, the fuzzers, and the op oracle matrix through Triton (its compiles).
# Under xdist a test that starts last and runs a minute is the run's tail, so on GPUs they start first.
SLOW_ON_GPU = ("test_context_parallel.py::", "test_check.py::test_gpu_run", "test_fuzz.py::",
               "::test_forward_backward_matches_oracle[triton-", "test_library.py::test_compile_fullgraph",
               "test_canon_lm.py::test_context_parallel", "test_host_path.py::test_example_diagnosis",
               "test_kernel_asm.py::test_sliding_window_prototypes")


def slow_first(nodeids: list[str]) -> list[int]:
    """Indices of `nodeids` in run order: those matching `SLOW_ON_GPU` first, each group in its own order."""
    slow = [any(mark in nodeid for mark in SLOW_ON_GPU) for nodeid in nodeids]
    return sorted(range(len(nodeids)), key=lambda i: not slow[i])


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device") == "cuda":
        items[:] = [items[i] for i in slow_first([item.nodeid for item in items])]
    shard = config.getoption("--shard")
    if shard is not None:
        kept = set(in_shard(len(items), shard))
        config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i not in kept])
        items[:] = [item for i, item in enumerate(items) if i in kept]


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    dev = torch.device(request.config.getoption("--device"))
    reason = _device_skip_reason(dev)
    if reason:
        pytest.skip(reason)
    if dev.type == "cuda":
        index = spread_worker(os.environ.get("PYTEST_XDIST_WORKER"), torch.cuda.device_count())
        if index is not None:  # `torch.device("cuda")` tensors go to the worker's current device
            torch.cuda.set_device(index)
    return dev


def record_defines(monkeypatch, kernel_name: str) -> list[dict]:
    """The defines of each variant of `kernel_name` the launchers ask `cuda._runtime.kernel` for, in order."""
    from causal_conv1d_mps.cuda import _runtime

    asked = []
    real = _runtime.kernel

    def spy(name, defines, device):
        if name == kernel_name:
            asked.append(dict(defines))
        return real(name, defines, device)

    monkeypatch.setattr(_runtime, "kernel", spy)
    return asked


def serve_through_cuda_launchers(device, monkeypatch, launchers: list[tuple[object, str]]) -> list[bool]:
    """Forces the Triton backend, whose CUDA C++ launchers serve bf16 calls on a GPU (and here cpu tensors
    through their test harness), and spies on `launchers` ((module, function name) pairs); returns the list
    of whether each of their calls served. Skips where those kernels cannot run on `device`."""
    import functools

    from causal_conv1d_mps import _activation, _backend
    from causal_conv1d_mps.cuda import _runtime, launch

    if device.type not in ("cpu", "cuda"):
        pytest.skip(f"CUDA C++ kernels: not on {device.type}")
    reason = _backend.backend_unavailable_reason("triton", device, torch.bfloat16)
    if reason is not None:
        pytest.skip(f"backend triton on {device}: {reason}")
    probe = torch.zeros(1, 8, 16, dtype=torch.bfloat16, device=device), torch.ones(8, 4, device=device)
    if launch.conv_fwd_bdt(*probe, None, _activation.SILU, allow_cpu=device.type == "cpu") is None:
        pytest.skip(f"CUDA C++ kernels on {device}: {_runtime.unavailable_reason(device)}")
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "triton")
    served = []

    def spy(fn, *args, **kwargs):
        result = fn(*args, **kwargs, allow_cpu=device.type == "cpu")
        served.append(result is not None and result is not False)
        return result

    for module, name in launchers:
        monkeypatch.setattr(module, name, functools.partial(spy, getattr(module, name)))
    return served


def skip_unless_cuda_kernel(device: torch.device, kernel_name: str, **defines) -> None:
    """Skips (with the reason) unless the CUDA C++ kernel `kernel_name` compiles on `device`: NVRTC on a GPU,
    `cuda_harness` on CPU. The variant: a bf16 SiLU call with bias at W = 4, then the kernel's own `defines`."""
    from causal_conv1d_mps import _activation
    from causal_conv1d_mps.cuda import _runtime

    if device.type == "mps":
        pytest.skip("CUDA C++ kernels: not on mps")
    probe = dict(CC_W=4, CC_X_BF16=1, CC_WT=0, CC_HAS_BIAS=1, CC_ACTIVATION=_activation.SILU, **defines)
    if _runtime.kernel(kernel_name, probe, device) is None:
        pytest.skip(f"CUDA C++ kernels on {device}: {_runtime.unavailable_reason(device)}")


@pytest.fixture
def btd(device):
    """The channel-last CUDA C++ launcher module (`cuda.launch_btd`), on a device where its kernels compile
    (skips with the reason otherwise)."""
    from causal_conv1d_mps.cuda import launch_btd

    skip_unless_cuda_kernel(device, "cc_conv_fwd_btd", CC_HAS_MASK=1, CC_MASK_T=0, CC_RESIDUAL=1, CC_FWD_VEC=4,
                            CC_FWD_RUN=8, CC_FWD_INSIDE=0, CC_D=0)
    return launch_btd


@pytest.fixture(params=[pytest.param(name, marks=getattr(pytest.mark, name)) for name in BACKENDS])
def backend(request, device, monkeypatch) -> str:
    """Forces one backend for the test; skips where `_backend` says it cannot run on `device`."""
    from causal_conv1d_mps._backend import backend_unavailable_reason

    name = request.param
    reason = backend_unavailable_reason(name, device)
    if reason is not None:
        pytest.skip(f"backend {name} on {device}: {reason}")
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", name)
    return name


@pytest.fixture
def triton_backend(device, monkeypatch):
    """Forces the Triton backend (skips where it cannot run on `device`); returns the device."""
    from causal_conv1d_mps._backend import backend_unavailable_reason

    reason = backend_unavailable_reason("triton", device)
    if reason is not None:
        pytest.skip(f"backend triton on {device}: {reason}")
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "triton")
    return device


@pytest.fixture
def tiles(monkeypatch):
    """`tiles(name, **config)`: force a Triton tile config (cleared again after the test)."""
    from causal_conv1d_mps.triton import _config

    def force(name, **config):
        monkeypatch.setitem(_config.OVERRIDES, name, config)
        _config.clear()

    yield force
    _config.clear()


def uses_small_shapes(backend: str, device: torch.device) -> bool:
    """Kernel backends on CPU run in an interpreter/harness: keep their shapes small."""
    return backend in KERNEL_BACKENDS and device.type == "cpu"


def small_shapes(backend: str, device: torch.device) -> list[tuple[int, int, int]]:
    """`(B, D, T)` triples: awkward sizes (T off every block size, T < W, odd D, B == 1).

    Empty shapes (B == 0, T == 0) are covered by dedicated tests.
    """
    if uses_small_shapes(backend, device):
        return [(2, 5, 17), (1, 33, 3), (3, 5, 67), (2, 7, 1), (1, 4, 130)]
    return [(2, 32, 129), (1, 33, 151), (3, 5, 1), (2, 17, 3), (1, 16, 1030), (4, 8, 67)]


def shapes_for_case(backend: str, device: torch.device, case: int) -> list[tuple[int, tuple[int, int, int]]]:
    """`(i, (B, D, T))` pairs for one parametrised case.

    The reference path takes every shape of `small_shapes`; a kernel backend on CPU takes one,
    rotating with `case`, so that across the matrix every shape is still met (the interpreter
    costs seconds per call). `i` is the shape's index, used by tests to vary optional inputs.
    """
    shapes = small_shapes(backend, device)
    if uses_small_shapes(backend, device):
        i = case % len(shapes)
        return [(i, shapes[i])]
    return list(enumerate(shapes))


def tol(dtype: torch.dtype) -> float:
    return TOLERANCE[dtype]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """`||out - ref|| / ||ref||` in float64; absolute where the reference is all zero."""
    out64, ref64 = out.detach().cpu().to(torch.float64), ref.detach().cpu().to(torch.float64)  # mps has no float64
    diff = torch.linalg.vector_norm(out64 - ref64).item()
    scale = torch.linalg.vector_norm(ref64).item()
    return diff / scale if scale > 0 else diff


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """docs/CONTRACT.md section 6 check of `out` against the float64 `ref`, at the tolerance of `dtype`."""
    assert tuple(out.shape) == tuple(ref.shape), f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    assert not torch.isnan(out).any() or torch.isnan(ref).any(), f"{name}: NaN in result, none in reference"
    err = rel_error(out, ref)
    assert err <= tol(dtype), f"{name}: relative error {err:.3e} > {tol(dtype):.0e} ({dtype}, shape {tuple(ref.shape)})"


def assert_equal_exact(out: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """Bitwise equality (decode states are copies of inputs, docs/CONTRACT.md section 6)."""
    assert tuple(out.shape) == tuple(ref.shape), f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype}, expected {ref.dtype}"
    mismatch = (out.cpu() != ref.cpu()) & ~(torch.isnan(out.cpu()) & torch.isnan(ref.cpu()))
    assert not mismatch.any(), f"{name}: {int(mismatch.sum())} of {out.numel()} entries differ"


def randn(*shape, dtype=torch.float32, device="cpu", generator=None, scale=1.0) -> torch.Tensor:
    """Normal values generated in float32 on CPU (reproducible across devices), then cast."""
    t = torch.randn(*shape, generator=generator, dtype=torch.float32) * scale
    return t.to(device=device, dtype=dtype)


def make_params(dim: int, width: int, dtype, device, generator, with_bias=True):
    """Non-trivial depthwise weights `[D, W]` and bias `[D]` (scaled like nn.Conv1d's init)."""
    weight = randn(dim, width, dtype=dtype, device=device, generator=generator, scale=width**-0.5)
    bias = randn(dim, dtype=dtype, device=device, generator=generator, scale=0.5) if with_bias else None
    return weight, bias


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """A detached copy that requires grad (or None)."""
    return None if t is None else t.detach().clone().requires_grad_(True)


def leaf64(t: torch.Tensor | None) -> torch.Tensor | None:
    """The same values as a float64 CPU leaf for the oracle (MPS has no float64)."""
    return None if t is None else t.detach().cpu().to(torch.float64).requires_grad_(True)


def oracle_grads(outputs, cotangents, inputs) -> list[torch.Tensor | None]:
    """Gradients of `sum(<output, cotangent>)` with respect to `inputs` (float64 oracle graph)."""
    live = [t for t in inputs if t is not None]
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if c is not None and o.numel() > 0]
    if not pairs or not live:
        return [None if t is None else torch.zeros_like(t) for t in inputs]
    total = sum((o * c.detach().cpu().to(torch.float64)).sum() for o, c in pairs)
    if not total.requires_grad:  # no output depends on the inputs (e.g. every decode row is padding)
        return [None if t is None else torch.zeros_like(t) for t in inputs]
    found = torch.autograd.grad(total, live, allow_unused=True)
    it = iter(found)
    result = []
    for t in inputs:
        if t is None:
            result.append(None)
        else:
            g = next(it)
            result.append(torch.zeros_like(t) if g is None else g)
    return result


def check_silu_conv_with_seq_idx(x, weight, bias, seq_idx, generator, name: str) -> None:
    """`causal_conv1d(x, weight, bias, "silu", seq_idx=seq_idx)` and its gradients (dx, dweight, dbias) for a
    random dout against the float64 oracle (`tests/oracle.py`), at float32's tolerance."""
    import causal_conv1d_mps as ccmps
    import oracle

    xg, wg, bg = leaf(x), leaf(weight), leaf(bias)
    out = ccmps.causal_conv1d(xg, wg, bg, "silu", seq_idx=seq_idx)
    dout = randn(*out.shape, device=x.device, generator=generator)
    out.backward(dout)
    x64, w64, b64 = leaf64(x), leaf64(weight), leaf64(bias)
    ref, _ = oracle.causal_conv1d(x64, w64, b64, "silu", seq_idx=seq_idx)
    assert_close_rel(out, ref, torch.float32, f"{name} out")
    for label, got, want in zip(("dx", "dweight", "dbias"), (xg, wg, bg), oracle_grads([ref], [dout], [x64, w64, b64])):
        assert_close_rel(got.grad, want, torch.float32, f"{name} {label}")


def assert_close_nonfinite(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """Like `assert_close_rel`, for results that may hold NaN/Inf: the same entries must be NaN, +Inf and
    -Inf as in the float64 `ref`, and the finite entries must agree at the tolerance of `dtype`."""
    assert tuple(out.shape) == tuple(ref.shape), f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    got, want = out.detach().cpu().to(torch.float64), ref.detach().cpu().to(torch.float64)
    for label, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        differ = test(got) != test(want)
        assert not differ.any(), (f"{name}: {int(differ.sum())} entries differ in being {label} "
                                  f"(first at {tuple(differ.nonzero()[0].tolist())})")
    finite = torch.isfinite(want)
    if finite.any():
        assert_close_rel(got[finite], want[finite], dtype, f"{name} (finite entries)")


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that reach this package's Dao-style functions (`api.causal_conv1d_fn`,
    `api.causal_conv1d_update`), e.g. through transformers' modeling code: proof that a model used it."""
    from causal_conv1d_mps import api

    calls = {"causal_conv1d_fn": 0, "causal_conv1d_update": 0}
    for name in calls:
        real = getattr(api, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(api, name, counting)
    return calls


class RecordingDriver:
    """Stands in for `cuLaunchKernel`: decodes each launch (pointers, then 32-bit ints) and returns the
    next of `results` (0: success). `layouts` maps a kernel handle to its own (pointers, ints) where kernels
    of different signatures are launched."""

    def __init__(self, pointers: int, ints: int, results=(), layouts: dict[int, tuple[int, int]] | None = None):
        self.pointers, self.ints, self.results, self.launches = pointers, ints, list(results), []
        self.layouts = layouts or {}

    def __call__(self, func, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        import ctypes

        pointers, ints = self.layouts.get(func.value, (self.pointers, self.ints))
        values = [ctypes.c_void_p.from_address(params[i]).value or 0 for i in range(pointers)]
        values += [ctypes.c_int.from_address(params[pointers + i]).value for i in range(ints)]
        self.launches.append(dict(func=func.value, grid=(gx, gy, gz), block=(bx, by, bz), shared=shared,
                                  stream=stream.value or 0, args=values, extra=extra))
        return self.results.pop(0) if self.results else 0


def stand_in_cuda_driver(monkeypatch, launch_kernel, handles: dict[str, int] | None = None,
                         stream: int = 0x77) -> None:
    """The GPU parts of `causal_conv1d_mps.cuda._runtime` stood in, so that the launchers' pointer branch (the
    GPU's) runs on CPU tensors: each kernel "compiles" to a `_DriverKernel` whose handle is `handles[name]`
    (0x1000 for every kernel when None), `cuLaunchKernel` is `launch_kernel`, the current device -1 (what the
    launchers key CPU tensors by) and the current stream `stream`."""
    import ctypes

    from causal_conv1d_mps.cuda import _runtime

    class Compiled:
        def __init__(self, name):
            self.func = ctypes.c_void_p(0x1000 if handles is None else handles[name])

    monkeypatch.setattr(_runtime, "_kernels", {})
    monkeypatch.setattr(_runtime, "_compile", lambda name, defines, device, index: _runtime._DriverKernel(
        Compiled(name), index))
    monkeypatch.setattr(_runtime, "_libcuda", object())
    monkeypatch.setattr(_runtime, "_launch_kernel", launch_kernel)
    monkeypatch.setattr(_runtime, "_current_device", lambda: -1)
    monkeypatch.setattr(_runtime, "_current_stream", lambda index: stream)


def skip_without_lfm3() -> None:
    """Skip where the installed transformers has no LFM3 (W = 7): it came after the oldest supported (5.15)."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("transformers.models.lfm3") is None:
        pytest.skip(f"transformers {importlib.metadata.version('transformers')} has no LFM3")
