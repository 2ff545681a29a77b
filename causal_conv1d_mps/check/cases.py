"""The accuracy checks: for each op, inputs on the device, the package's call, and its float64 expectation.

Inputs are drawn in float32 on the CPU from a seeded generator and rounded to the dtype under check. The
call runs the public function on the device (forward, then the gradients of `<out, dout>` plus
`<final_states, dfinal>` for random cotangents where the op is differentiable). The expectation runs the
functions of `causal_conv1d_mps.reference` in float64 on the CPU (MPS has no float64) on the same rounded
values. Sizes are awkward on purpose: odd `D`, `T` off every block size, `T < W`, `B = 1`, a sequence
shorter than the width, a strided `x`, decode steps longer than the state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import causal_conv1d_mps as ccmps
from causal_conv1d_mps import reference
from causal_conv1d_mps.ops import in_layout_of

WIDTHS = (2, 4, 7, 16, 33)  # short, the common 4, odd, the widest unrolled kernel, a generic one
WIDE = 33  # beyond every unrolled kernel; costly in the Triton interpreter, so --quick tries it on cheap cases only
Outputs = dict[str, Tensor]


@dataclass
class Trial:
    """One run of one case at one dtype and width."""

    shape: str  # the sizes used, e.g. "B2 D5 T37"
    run: Callable[[], Outputs]  # the package on the device: named outputs (and gradients)
    expect: Callable[[], Outputs]  # float64 on the CPU, the same names
    exact: tuple[str, ...] = ()  # outputs that must match bit for bit (states are copies of inputs)


@dataclass(frozen=True)
class Case:
    op: str  # the public function checked
    label: str  # what the case covers
    build: Callable[["Draw", int], Trial]  # (inputs drawn for one dtype, width) -> trial
    wide: bool = False  # cheap enough at W = 33 in an interpreter: --quick checks it there


@dataclass(frozen=True)
class Pair:
    dev: Tensor | None  # on the device, in the dtype under check
    ref: Tensor | None  # the same values on the CPU in float64 (integer tensors: int32)


NONE = Pair(None, None)


class Draw:
    """Seeded inputs for one trial, each as a device tensor and its float64 CPU twin."""

    def __init__(self, dtype: torch.dtype, device: torch.device, seed: int):
        self.dtype, self.device = dtype, device
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, scale: float = 1.0) -> Pair:
        t = (torch.randn(*shape, generator=self.gen) * scale).to(self.dtype)
        return Pair(t.to(self.device), t.to(torch.float64))

    def params(self, dim: int, width: int, bias: bool) -> tuple[Pair, Pair]:
        """Weights `[D, W]` scaled like nn.Conv1d's init; bias `[D]` or absent."""
        return self.normal(dim, width, scale=width**-0.5), (self.normal(dim, scale=0.5) if bias else NONE)

    def ints(self, values: Tensor) -> Pair:
        t = values.to(torch.int32)
        return Pair(t.to(self.device), t)


def _leaf(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone().requires_grad_(True)


def _gradients(outputs: list[Tensor], cotangents: list[Tensor], inputs: dict[str, Tensor | None]) -> Outputs:
    """`{"d" + name: gradient}` of `sum(<output, cotangent>)` for each input that is not None."""
    live = {k: v for k, v in inputs.items() if v is not None}
    found = torch.autograd.grad(outputs, list(live.values()), cotangents)
    return {f"d{k}": g for k, g in zip(live, found)}


def _present(**named: Tensor | None) -> Outputs:
    return {k: v for k, v in named.items() if v is not None}


# ---------------------------------------------------------------------------------------------------------
# causal_conv1d: (B, D, T), contiguous or channel-last


def _seq_idx(batch: int, length: int) -> Tensor:
    """`[B, T]`: two packed sequences per row (the split moves with the row), then padding (-1) at the end."""
    t = torch.arange(length)
    rows = []
    for b in range(batch):
        ids = (t >= max(1, length // 3 + b)).to(torch.int64)
        ids[t >= length - length // 5] = -1
        rows.append(ids)
    return torch.stack(rows)


def conv_case(label: str, batch: int, dim: int, length: int, *, channel_last=False, seq=False, init=False,
              bias=True, silu=True, wide=False) -> Case:
    def build(draw: Draw, width: int) -> Trial:
        if channel_last:
            raw = draw.normal(batch, length, dim)
            x = Pair(raw.dev.transpose(1, 2), raw.ref.transpose(1, 2))
        else:
            x = draw.normal(batch, dim, length)
        w, b = draw.params(dim, width, bias)
        s0 = draw.normal(batch, dim, width - 1) if init else NONE
        seq_idx = draw.ints(_seq_idx(batch, length)) if seq else NONE
        dout, dfinal = draw.normal(batch, dim, length), draw.normal(batch, dim, width - 1)
        act = "silu" if silu else None

        def run() -> Outputs:
            leaves = {"x": _leaf(x.dev), "weight": _leaf(w.dev), "bias": _leaf(b.dev), "initial_states": _leaf(s0.dev)}
            out, final = ccmps.causal_conv1d(leaves["x"], leaves["weight"], leaves["bias"], act, seq_idx=seq_idx.dev,
                                             initial_states=leaves["initial_states"], return_final_states=True)
            grads = _gradients([out, final], [dout.dev, dfinal.dev], leaves)
            return {"out": out.detach(), "final_states": final.detach(), **grads}

        def expect() -> Outputs:
            out, final = reference.causal_conv1d_fwd(x.ref, w.ref, b.ref, seq_idx.ref, s0.ref, silu, True)
            dx, dw, db, ds = reference.causal_conv1d_bwd(x.ref, w.ref, b.ref, seq_idx.ref, s0.ref,
                                                         in_layout_of(dout.ref, x.ref), dfinal.ref, silu)
            return _present(out=out, final_states=final, dx=dx, dweight=dw, dbias=db if bias else None,
                            dinitial_states=ds if init else None)

        return Trial(f"B{batch} D{dim} T{length}", run, expect)

    return Case("causal_conv1d", label, build, wide)


# ---------------------------------------------------------------------------------------------------------
# short_conv_fused: (B, T, D)


def _padding_mask(batch: int, length: int) -> Tensor:
    """HF-style int64 `[B, T]`: odd rows left-padded by a quarter of the sequence (at least one position)."""
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1::2, : max(1, length // 4)] = 0
    return mask


def fused_case(label: str, batch: int, length: int, dim: int, *, mask=False, residual=True, init=False,
               cu_seqlens: tuple[int, ...] | None = None, row_stride=0, bias=True, silu=True, wide=False) -> Case:
    rows = batch if cu_seqlens is None else len(cu_seqlens) - 1

    def build(draw: Draw, width: int) -> Trial:
        if row_stride:  # x is the last D columns of a wider [B, T, row_stride] tensor, read in place
            wider = draw.normal(batch, length, row_stride)
            x = Pair(wider.dev[..., row_stride - dim:], wider.ref[..., row_stride - dim:])
        else:
            x = draw.normal(batch, length, dim)
        w, b = draw.params(dim, width, bias)
        s0 = draw.normal(rows, dim, width - 1) if init else NONE
        m = _padding_mask(batch, length) if mask else None
        m_dev, m_ref = (None, None) if m is None else (m.to(draw.device), m.to(torch.float64))
        cu = draw.ints(torch.tensor(cu_seqlens)) if cu_seqlens is not None else NONE
        dout, dfinal = draw.normal(batch, length, dim), draw.normal(rows, dim, width - 1)

        def run() -> Outputs:
            leaves = {"x": _leaf(x.dev), "weight": _leaf(w.dev), "bias": _leaf(b.dev), "initial_states": _leaf(s0.dev)}
            out, final = ccmps.short_conv_fused(leaves["x"], leaves["weight"], leaves["bias"], m_dev, silu, residual,
                                                initial_states=leaves["initial_states"], return_final_states=True,
                                                cu_seqlens=cu.dev)
            grads = _gradients([out, final], [dout.dev, dfinal.dev], leaves)
            return {"out": out.detach(), "final_states": final.detach(), **grads}

        def expect() -> Outputs:
            out, final = reference.short_conv_fused_fwd(x.ref, w.ref, b.ref, m_ref, s0.ref, cu.ref, silu, residual,
                                                        True)
            dx, dw, db, ds = reference.short_conv_fused_bwd(x.ref, w.ref, b.ref, m_ref, s0.ref, cu.ref, dout.ref,
                                                            dfinal.ref, silu, residual)
            return _present(out=out, final_states=final, dx=dx, dweight=dw, dbias=db if bias else None,
                            dinitial_states=ds if init else None)

        return Trial(f"B{batch} T{length} D{dim}" + (f" N{rows}" if cu_seqlens else ""), run, expect)

    return Case("short_conv_fused", label, build, wide)


# ---------------------------------------------------------------------------------------------------------
# Decode: short_conv_update ((B, D) or (B, L, D)) and causal_conv1d_update (Dao's (B, D) or (B, D, L))


def _state_indices(batch: int, slots: int) -> Tensor:
    """`[B]`: distinct slots in reverse order, row 1 a padding row (-1) when B >= 2."""
    idx = torch.arange(slots - 1, slots - 1 - batch, -1)
    if batch >= 2:
        idx[1] = -1
    return idx


def update_case(label: str, batch: int, dim: int, *, steps=1, extra_state=0, circular=False, indices=False,
                dao=False, silu=True, residual=True, bias=True, grad=False, wide=False) -> Case:
    """`steps` tokens per row (None: one token without the L dimension); `steps` may be a callable of W;
    the state holds `W - 1 + extra_state` columns."""
    if grad and (circular or indices):
        raise ValueError("the differentiable decode case runs in shift mode without conv_state_indices")

    def build(draw: Draw, width: int) -> Trial:
        length = steps(width) if callable(steps) else steps
        state_len = width - 1 + extra_state
        slots = batch + 2 if indices else batch
        x3 = draw.normal(batch, length or 1, dim)  # [B, L, D]
        if length is None:
            x = Pair(x3.dev[:, 0], x3.ref[:, 0])
        elif dao:
            x = Pair(x3.dev.transpose(1, 2), x3.ref.transpose(1, 2))
        else:
            x = x3
        w, b = draw.params(dim, width, bias)
        state = draw.normal(slots, dim, state_len)
        g = torch.Generator().manual_seed(width)
        seqlens = draw.ints(torch.randint(0, max(state_len, 1), (batch,), generator=g)) if circular else NONE
        idx = draw.ints(_state_indices(batch, slots)) if indices else NONE
        dout = draw.normal(*x.ref.shape) if grad else NONE

        def run() -> Outputs:
            conv_state = state.dev.clone()
            if dao:
                out = ccmps.causal_conv1d_update(x.dev, conv_state, w.dev, b.dev, "silu" if silu else None, seqlens.dev,
                                                 idx.dev)
                return {"out": out, "state": conv_state}
            leaves = {"x": _leaf(x.dev), "weight": _leaf(w.dev), "bias": _leaf(b.dev)} if grad else \
                {"x": x.dev, "weight": w.dev, "bias": b.dev}
            out = ccmps.short_conv_update(leaves["x"], conv_state, leaves["weight"], leaves["bias"], seqlens.dev, silu,
                                          residual, conv_state_indices=idx.dev)
            grads = _gradients([out], [dout.dev], leaves) if grad else {}
            return {"out": out.detach(), "state": conv_state, **grads}

        def expect() -> Outputs:
            conv_state = state.ref.clone()
            out = reference.short_conv_update(x3.ref, conv_state, w.ref, b.ref, seqlens.ref, idx.ref, silu,
                                              residual and not dao)
            out = out[:, 0] if length is None else out.transpose(1, 2) if dao else out
            expected = {"out": out, "state": conv_state}
            if grad:  # the step's gradient treats the state read before the update as a constant input
                window = state.ref[..., state_len - (width - 1):].contiguous()
                d3 = dout.ref.unsqueeze(1) if length is None else dout.ref
                dx, dw, db, _ = reference.short_conv_fused_bwd(x3.ref, w.ref, b.ref, None, window, None, d3, None,
                                                               silu, residual)
                expected.update(_present(dx=dx[:, 0] if length is None else dx, dweight=dw,
                                         dbias=db if bias else None))
            return expected

        sizes = f"B{batch} D{dim} L{length or 1} S{state_len}" + (f" N{slots}" if indices else "")
        return Trial(sizes, run, expect, exact=("state",))

    return Case("causal_conv1d_update" if dao else "short_conv_update", label, build, wide)


# ---------------------------------------------------------------------------------------------------------
# causal_conv1d_varlen_states: (total_T, D) packed -> (N, D, state_len)


def varlen_states_case(label: str, dim: int, lengths: tuple[int, ...]) -> Case:
    cu_list = [0]
    for n in lengths:
        cu_list.append(cu_list[-1] + n)

    def build(draw: Draw, width: int) -> Trial:
        state_len = width  # longer than the short sequences: their states are zero-filled on the left
        x = draw.normal(cu_list[-1], dim)
        cu = draw.ints(torch.tensor(cu_list))

        def run() -> Outputs:
            return {"states": ccmps.causal_conv1d_varlen_states(x.dev, cu.dev, state_len)}

        def expect() -> Outputs:
            return {"states": reference.causal_conv1d_varlen_states(x.ref, cu.ref, state_len)}

        return Trial(f"T{cu_list[-1]} D{dim} N{len(lengths)} S{state_len}", run, expect, exact=("states",))

    return Case("causal_conv1d_varlen_states", label, build, wide=True)


CASES: tuple[Case, ...] = (
    conv_case("contiguous, bias, SiLU, initial/final states", 2, 5, 37, init=True),
    conv_case("channel-last, seq_idx with padding, initial states", 3, 7, 29, channel_last=True, seq=True,
              init=True),
    conv_case("no bias, no activation, T < W", 1, 33, 3, bias=False, silu=False, wide=True),
    conv_case("B = 1, long T, seq_idx", 1, 4, 300, seq=True),
    fused_case("mask, bias, SiLU, residual, initial/final states", 2, 41, 7, mask=True, init=True),
    fused_case("cu_seqlens (one sequence shorter than W), initial states, no residual", 1, 50, 6,
               cu_seqlens=(0, 1, 20, 50), init=True, residual=False, bias=False),
    fused_case("strided x (slice of a wider tensor), no SiLU", 2, 19, 5, row_stride=9, silu=False, wide=True),
    update_case("one token (B, D), shift, state of W-1", 3, 9, steps=None),
    update_case("circular, conv_state_indices with padding, L = 3", 4, 5, steps=3, extra_state=2, circular=True,
                indices=True, wide=True),
    update_case("shift, conv_state_indices, L > state length", 3, 4, steps=lambda w: w + 2, indices=True,
                residual=False),
    update_case("gradients (x, weight, bias), shift, L = 2", 2, 6, steps=2, extra_state=2, grad=True),
    update_case("Dao layout (B, D, L), circular, SiLU", 2, 5, steps=2, extra_state=1, circular=True, dao=True,
                wide=True),
    update_case("one token (B, D), no bias, no activation, conv_state_indices", 3, 7, steps=None, indices=True,
                dao=True, silu=False, bias=False, wide=True),
    varlen_states_case("packed sequences, some shorter than the state", 6, (1, 9, 3, 20)),
)
