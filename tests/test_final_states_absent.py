"""Final states that were not asked for (docs/BACKENDS.md, docs/PERFORMANCE.md section 4.5).

A backend's forward returns None in their place, whichever road it takes (its kernels, the CUDA C++
kernels, the reference path for wide filters). The custom ops, whose schemas return tensors, put a new
empty tensor there on every call, eagerly and under torch.compile. The public functions return `out`
alone, and context parallelism, whose autograd Functions return the op's final states as an output, keeps
no graph alive after its caller lets go of the result.
"""
from __future__ import annotations

import gc
import json
import tempfile
import weakref
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import causal_conv1d_mps as ccmps
from causal_conv1d_mps import _backend
from causal_conv1d_mps._activation import SILU
from conftest import seeded, serve_through_cuda_launchers

B, D, T = 2, 3, 11


def _rand(*shape, gen, device, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(device, dtype)


def _conv_case(device, layout: str, width: int = 4):
    """(backend function name, its arguments before `return_final_states`, rows of the final states)."""
    gen = seeded(41)
    x = _rand(B, D, T, gen=gen, device=device)
    if layout == "channel-last":
        x = _rand(B, T, D, gen=gen, device=device).transpose(1, 2)
    weight, bias = _rand(D, width, gen=gen, device=device), _rand(D, gen=gen, device=device)
    seq_idx = init = None
    if layout == "seq_idx":
        seq_idx = torch.tensor([[0] * 4 + [1] * 7, [2] * 9 + [-1] * 2], dtype=torch.int32, device=device)
        init = _rand(B, D, width - 1, gen=gen, device=device)
    return "causal_conv1d_fwd", (x, weight, bias, seq_idx, init, SILU), B


def _fused_case(device, packed: bool):
    gen = seeded(42)
    x = _rand(1 if packed else B, T, D, gen=gen, device=device)
    weight, bias = _rand(D, 4, gen=gen, device=device), _rand(D, gen=gen, device=device)
    if packed:
        cu = torch.tensor([0, 4, 4, T], dtype=torch.int32, device=device)
        init = _rand(3, D, 3, gen=gen, device=device)
        return "short_conv_fused_fwd", (x, weight, bias, None, init, cu, SILU, True), 3
    mask = (torch.arange(T, device=device) % 4 != 1).float().expand(B, T).contiguous()
    return "short_conv_fused_fwd", (x, weight, bias, mask, None, None, SILU, True), B


CASES = {
    "conv [B, D, T]": lambda device: _conv_case(device, "contiguous"),
    "conv channel-last": lambda device: _conv_case(device, "channel-last"),
    "conv seq_idx + initial states": lambda device: _conv_case(device, "seq_idx"),
    "conv W = 25": lambda device: _conv_case(device, "contiguous", width=25),  # Triton: the reference path
    "fused with a mask": lambda device: _fused_case(device, packed=False),
    "fused cu_seqlens + initial states": lambda device: _fused_case(device, packed=True),
}


def _check_forward(fn, args, rows: int, width: int, label: str) -> None:
    out, final = fn(*args, False)
    assert final is None, f"{label}: final states not asked for came back as {type(final).__name__}"
    out_again, final = fn(*args, True)
    assert torch.equal(out, out_again), f"{label}: out depends on return_final_states"
    dim = args[1].shape[0]
    assert isinstance(final, torch.Tensor) and final.shape == (rows, dim, width - 1), f"{label}: {final.shape}"
    assert final.dtype == args[0].dtype and final.is_contiguous(), f"{label}: {final.dtype}, {final.stride()}"


@pytest.mark.parametrize("case", list(CASES))
def test_every_backend_returns_none_for_final_states_not_asked_for(backend, device, case):
    name, args, rows = CASES[case](device)
    module = _backend.select(device, args[0].dtype)
    _check_forward(getattr(module, name), args, rows, args[1].shape[1], f"{backend}, {case}")


@pytest.fixture
def cuda_kernels(device, monkeypatch):
    """Whether each call of the CUDA C++ forward launchers served (the Triton backend forced)."""
    from causal_conv1d_mps.cuda import launch, launch_btd

    return serve_through_cuda_launchers(device, monkeypatch, [(launch, "conv_fwd_bdt"), (launch_btd, "conv_fwd_btd")])


@pytest.mark.parametrize("op", ["causal_conv1d_fwd", "short_conv_fused_fwd"])
def test_the_cuda_kernels_road_returns_none_too(cuda_kernels, device, op):
    """The Triton backend's early return after a CUDA C++ launch (the road of small calls on a GPU)."""
    from causal_conv1d_mps import triton as triton_backend

    gen = seeded(43)
    weight, bias = _rand(8, 4, gen=gen, device=device), _rand(8, gen=gen, device=device)
    if op == "causal_conv1d_fwd":
        args = (_rand(2, 8, 32, gen=gen, device=device, dtype=torch.bfloat16), weight, bias, None, None, SILU)
    else:
        args = (_rand(2, 32, 8, gen=gen, device=device, dtype=torch.bfloat16), weight, bias, None, None, None,
                SILU, True)
    _check_forward(getattr(triton_backend, op), args, 2, 4, op)
    assert cuda_kernels and all(cuda_kernels), f"the CUDA C++ launchers declined: {cuda_kernels}"


def _op_args(name: str, device):
    case = "conv [B, D, T]" if name == "causal_conv1d_fwd" else "fused with a mask"
    return CASES[case](device)[1]


@pytest.mark.parametrize("name", ["causal_conv1d_fwd", "short_conv_fused_fwd"])
def test_the_custom_ops_put_a_new_empty_tensor_in_its_place(backend, device, name):
    """The schema returns a tensor: eagerly through the dispatcher and under torch.compile the op returns an
    empty one of x's dtype and device, a new one on every call (never one tensor shared between calls)."""
    op = getattr(torch.ops.causal_conv1d_mps, name)
    args = _op_args(name, device)
    x = args[0]
    first, second = op(*args, False)[1], op(*args, False)[1]
    compiled = torch.compile(lambda *a: op(*a, False), fullgraph=True, backend="aot_eager")
    third = compiled(*args)[1]
    for final in (first, second, third):
        assert isinstance(final, torch.Tensor), type(final)
        assert final.shape == (0,) and final.dtype == x.dtype and final.device == x.device, final
    assert first is not second


ENTRIES = {
    "causal_conv1d": lambda x, w, **k: ccmps.causal_conv1d(x.transpose(1, 2), w, None, "silu", **k),
    "causal_conv1d_fn": lambda x, w, **k: ccmps.causal_conv1d_fn(x.transpose(1, 2), w, activation="silu", **k),
    "short_conv_fused": lambda x, w, **k: ccmps.short_conv_fused(x, w, **k),
}


@pytest.mark.parametrize("mode", ["no grad", "grad", "compiled"])
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_public_functions_return_out_alone(device, monkeypatch, entry, mode):
    """What a backend returns in place of the final states never reaches the caller (backends: above)."""
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "reference")
    gen = seeded(44)
    x, w = _rand(B, T, D, gen=gen, device=device), _rand(D, 4, gen=gen, device=device)
    if mode == "grad":
        x, w = x.requires_grad_(), w.requires_grad_()
    call = ENTRIES[entry]
    if mode == "compiled":
        call = torch.compile(call, fullgraph=True, backend="aot_eager")
    with torch.set_grad_enabled(mode != "no grad"):
        out = call(x, w)
        with_final, final = call(x, w, return_final_states=True)
    assert isinstance(out, torch.Tensor), f"{entry} ({mode}) returned {type(out).__name__}"
    torch.testing.assert_close(out, with_final, rtol=0, atol=0)
    assert final.shape == (B, D, 3)
    if mode == "grad":
        assert out.requires_grad


# ------------------------------------------------------------------- context parallelism (2 ranks, gloo)


def _graph_is_released(call) -> str:
    """"" when `call(x)`'s autograd graph, and with it the leaf `x` it saved, is freed once the result is
    dropped; else what stayed alive."""
    x = call.leaf()
    alive = weakref.ref(x)
    out = call(x)
    assert out.requires_grad
    del x, out
    gc.collect()
    return "" if alive() is None else "the graph of a dropped result is still alive (its input was kept)"


class _CpCall:
    """One context-parallel call without final states on this rank's slice, and the same call of the
    single-process op on the whole sequence."""

    def __init__(self, kind: str, context, rank: int, world: int):
        gen = torch.Generator().manual_seed(7)
        self.kind, self.context = kind, context
        self.fused = kind in ("fused", "packed")
        total = 13
        self.whole = torch.randn(1 if kind == "packed" else B, total, D, generator=gen)
        self.weight = torch.randn(D, 4, generator=gen)
        self.mask = (torch.rand(B, total, generator=gen) > 0.2) if kind == "fused" else None
        self.cu = torch.tensor([0, 5, 5, 9, total], dtype=torch.int32) if kind == "packed" else None
        self.seq_idx = torch.tensor([[0] * 6 + [1] * 7, [3] * 2 + [-1] * 3 + [4] * 8], dtype=torch.int32)
        bounds = [0, 6, total] if world == 2 else None
        self.start, self.stop = bounds[rank], bounds[rank + 1]

    def leaf(self) -> torch.Tensor:
        return self.whole[:, self.start:self.stop].clone().requires_grad_()

    def __call__(self, x, context=True):
        import causal_conv1d_mps.context_parallel as cp

        lib, extra = (cp, {"context": self.context}) if context else (ccmps, {})
        start, stop = (self.start, self.stop) if context else (0, self.whole.shape[1])
        if self.fused:
            mask = None if self.mask is None else self.mask[:, start:stop]
            return lib.short_conv_fused(x, self.weight, None, mask, cu_seqlens=self.cu, **extra)
        seq = self.seq_idx[:, start:stop] if self.kind == "seq_idx" else None
        return lib.causal_conv1d(x.transpose(1, 2), self.weight, None, "silu", seq_idx=seq, **extra).transpose(1, 2)


CP_KINDS = ("rows", "rows, overlap", "seq_idx", "fused", "packed")


def _cp_case(kind: str, rank: int, world: int, group) -> str:
    import causal_conv1d_mps.context_parallel as cp

    call = _CpCall(kind, cp.ContextParallel(group, overlap=kind.endswith("overlap")), rank, world)
    whole = call.whole.clone().requires_grad_()
    ref = call(whole, context=False)
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(8))
    ref.backward(dout)
    x = call.leaf()
    out = call(x)
    out.backward(dout[:, call.start:call.stop])
    problems = []
    for label, got, want in (("out", out, ref[:, call.start:call.stop]),
                             ("dx", x.grad, whole.grad[:, call.start:call.stop])):
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            problems.append(f"{label} differs from the single-process op by {(got - want).abs().max():.3e}")
    problems.append(_graph_is_released(call))
    return "; ".join(p for p in problems if p)


def _cp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    results = {}
    for kind in CP_KINDS:
        try:
            results[kind] = _cp_case(kind, rank, world, dist.group.WORLD)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the case
            results[kind] = f"{type(exc).__name__}: {exc}"
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def cp_results(monkeypatch_module):
    import torch.multiprocessing as mp

    monkeypatch_module.setenv("CAUSAL_CONV1D_BACKEND", "reference")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_cp_worker, args=(2, str(Path(tmp, "rendezvous")), tmp), nprocs=2, join=True)
        return [json.loads(Path(tmp, f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize("kind", CP_KINDS)
def test_context_parallel_without_final_states_matches_and_lets_its_graph_go(cp_results, kind):
    """Out and dx equal the single-process op's, and a dropped result frees its graph: no tensor that
    outlives the call (a placeholder shared between calls) holds the Function's output."""
    problems = [f"rank {rank}: {found[kind]}" for rank, found in enumerate(cp_results) if found[kind]]
    assert not problems, "\n".join(problems)
