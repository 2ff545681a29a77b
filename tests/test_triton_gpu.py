"""GPU-only checks of the Triton backend: large shapes, 64-bit indexing, CUDA-graph capture, determinism.

Run with `pytest tests/test_triton_gpu.py --device cuda`; skipped otherwise (on the default `--device cpu`
the conftest exports TRITON_INTERPRET=1, which would turn the compiled kernels into interpreted ones).
The op-level tests (tests/test_*.py with `--device cuda`) cover the semantics; these cover what only a
real GPU can show. The oracle is the reference path in float64 on the GPU.
"""
from __future__ import annotations

import pytest
import torch

import causal_conv1d_mps as ccmps
import causal_conv1d_mps.triton as triton_backend
from causal_conv1d_mps import reference
from causal_conv1d_mps._activation import SILU

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch, device):
    if device.type != "cuda":
        pytest.skip("GPU-only: pass --device cuda")
    monkeypatch.setenv("CAUSAL_CONV1D_BACKEND", "triton")
    from causal_conv1d_mps import _backend

    _backend.clear_cache()
    yield
    _backend.clear_cache()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _randn(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channel-last"])
def test_large_forward_and_backward_match_float64(layout):
    B, D, T, W = 2, 1024, 8192, 4
    x = _randn(B, D, T) if layout == "contiguous" else _randn(B, T, D).transpose(1, 2)
    w, b = _randn(D, W, dtype=torch.float32, scale=0.5), _randn(D, dtype=torch.float32)
    h0 = _randn(B, D, W - 1)
    dout = torch.randn_like(x)
    dht = _randn(B, D, W - 1)
    out, final = triton_backend.causal_conv1d_fwd(x, w, b, None, h0, SILU, True)
    assert out.stride() == x.stride()
    ref_out, ref_final = reference.causal_conv1d_fwd(x.double(), w.double(), b.double(), None, h0.double(), SILU, True)
    assert _rel(out, ref_out) <= TOL[torch.bfloat16]
    assert torch.equal(final, ref_final.to(final.dtype))
    grads = triton_backend.causal_conv1d_bwd(x, w, b, None, h0, dout, dht, SILU)
    ref = reference.causal_conv1d_bwd(x.double(), w.double(), b.double(), None, h0.double(), dout.double(),
                                      dht.double(), SILU)
    for name, g, r in zip(("dx", "dweight", "dbias", "dinitial_states"), grads, ref):
        assert _rel(g, r) <= TOL[torch.bfloat16], f"{name}: {_rel(g, r):.2e}"


@pytest.mark.parametrize("layout", ["contiguous", "channel-last"])
def test_more_than_2_pow_31_elements(layout):
    """One batch row of 2**31 + 2**14 elements: the offsets of the last rows need 64 bits."""
    D, T, W = 1024, (1 << 21) + 16, 4
    need = 2 * D * T * 2 * 1.1
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.empty(1, D, T, device="cuda", dtype=torch.bfloat16) if layout == "contiguous" else \
        torch.empty(1, T, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    x.normal_()
    w, b = _randn(D, W, dtype=torch.float32, scale=0.5), _randn(D, dtype=torch.float32)
    out, _ = triton_backend.causal_conv1d_fwd(x, w, b, None, None, SILU, False)
    for start in (0, T // 2, T - 200):
        window = x[:, :, max(start - (W - 1), 0):start + 200]
        ref, _ = reference.causal_conv1d_fwd(window.double(), w.double(), b.double(), None, None, SILU, False)
        got = out[:, :, start:start + 200]
        assert _rel(got, ref[:, :, ref.shape[2] - got.shape[2]:]) <= TOL[torch.bfloat16], f"at t={start}"
    del out, x
    torch.cuda.empty_cache()


def test_cuda_graph_replays_forward_and_decode():
    B, T, D, W, S = 3, 300, 256, 4, 6
    x = _randn(1, T, D)
    cu = torch.tensor([0, 10, 10, 200, T], device="cuda", dtype=torch.int32)
    w, b = _randn(D, W, scale=0.5), _randn(D)
    h0 = _randn(4, D, W - 1)
    xd = _randn(B, 2, D)
    state = _randn(B, D, S)
    seqlens = torch.tensor([0, 5, 17], device="cuda", dtype=torch.int32)

    def step():
        y, fin = ccmps.short_conv_fused_fwd_only(x, w, b, initial_states=h0, return_final_states=True,
                                                 cu_seqlens=cu)
        yd = ccmps.short_conv_update_fwd_only(xd, state, w, b, cache_seqlens=seqlens)
        return y, fin, yd

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    state_before = state.clone()
    with torch.cuda.graph(graph):
        y, fin, yd = step()
    state.copy_(state_before)  # capture ran nothing; start from a known state
    for _ in range(2):
        x.normal_()
        xd.normal_()
        state0 = state.clone()
        graph.replay()
        torch.cuda.synchronize()
        ref_y, ref_fin = reference.short_conv_fused_fwd(x, w, b, None, h0, cu, SILU, True, True)
        ref_state = state0.clone()
        ref_yd = reference.short_conv_update(xd, ref_state, w, b, seqlens, None, SILU, True)
        assert _rel(y, ref_y) <= TOL[torch.bfloat16]
        assert torch.equal(fin, ref_fin)
        assert _rel(yd, ref_yd) <= TOL[torch.bfloat16]
        assert torch.equal(state, ref_state)


@pytest.mark.parametrize("varlen", [False, True])
def test_gradients_are_bitwise_deterministic(varlen):
    B, T, D, W = (1, 4099, 512, 4) if varlen else (4, 2053, 512, 4)
    x = _randn(B, T, D).requires_grad_()
    w = _randn(D, W, dtype=torch.float32, scale=0.5).requires_grad_()
    b = _randn(D, dtype=torch.float32).requires_grad_()
    cu = torch.tensor([0, 1000, 1003, 3000, T], device="cuda", dtype=torch.int32) if varlen else None
    rows = 4 if varlen else B
    h0 = _randn(rows, D, W - 1).requires_grad_()
    mask = torch.rand(B, T, device="cuda") > 0.2
    dout = torch.randn_like(x)
    runs = []
    for _ in range(3):
        y, fin = ccmps.short_conv_fused(x, w, b, mask, initial_states=h0, return_final_states=True, cu_seqlens=cu)
        runs.append(torch.autograd.grad((y, fin), (x, w, b, h0), (dout, torch.ones_like(fin))))
    for other in runs[1:]:
        for name, g0, g1 in zip(("dx", "dweight", "dbias", "dinitial_states"), runs[0], other):
            assert torch.equal(g0, g1), f"{name} differs between runs"
