"""The local convolution of one rank's slice, for each op: forward and backward through the package's ops.

An adapter hides the op's layout (time on dim 2 for `causal_conv1d`, dim 1 for `short_conv_fused`) and
its extra arguments, so that the context-parallel algorithm (`_functions.py`) is written once. Arguments
arrive validated and normalised as docs/BACKENDS.md requires; states are `[B, D, W-1]` in any float dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..api import _bdt_layout, _contig


class ConvSlice:
    """`causal_conv1d` on `x` `[B, D, T]` (contiguous or channel-last), optional bias and activation."""

    tdim = 2

    def __init__(self, weight: Tensor, bias: Tensor | None, activation: int):
        self.weight, self.bias, self.activation = weight, bias, activation

    def length(self, x: Tensor) -> int:
        return x.shape[2]

    def head(self, x: Tensor, n: int) -> Tensor:
        return _bdt_layout(x[:, :, :n])

    def forward(self, x: Tensor, states: Tensor | None, want_final: bool, seq_idx: Tensor | None = None):
        return ops.causal_conv1d(x, self.weight, self.bias, seq_idx, _contig(states), self.activation, want_final)

    def backward(self, x: Tensor, states: Tensor | None, dout: Tensor, dfinal: Tensor | None,
                 seq_idx: Tensor | None = None):
        return ops.causal_conv1d_bwd(x, self.weight, self.bias, seq_idx, _contig(states),
                                     ops.in_layout_of(dout, x), _contig(dfinal), self.activation)

    def tail_columns(self, x: Tensor, k: int, dtype: torch.dtype) -> Tensor:
        """`[B, D, k]`: the last k inputs, as the conv reads them."""
        t = x.shape[2]
        return x[:, :, t - k:].to(dtype)

    def add_tail_grad(self, dx: Tensor, x: Tensor, grad: Tensor) -> None:
        """Adds `grad` `[B, D, k]` (arriving on the last k conv inputs) into `dx` in place."""
        k = grad.shape[2]
        if k:
            t = dx.shape[2]
            dx[:, :, t - k:] += grad.to(dx.dtype)

    def put_head(self, out: Tensor, head: Tensor) -> None:
        out[:, :, :head.shape[2]].copy_(head)

    def head_of(self, t: Tensor, n: int) -> Tensor:
        return t[:, :, :n]


class FusedSlice:
    """`short_conv_fused` on `x` `[B, T, D]` (`x.stride(2) == 1`): mask, bias, activation (a code of
    `causal_conv1d_mps._activation`), residual.

    `mask` is the normalised `[B, T]` float mask or None. The conv reads `x * mask` with masked positions
    selected to exactly 0 (a NaN there never reaches another position)."""

    tdim = 1

    def __init__(self, weight: Tensor, bias: Tensor | None, mask: Tensor | None, activation: int, residual: bool):
        self.weight, self.bias, self.mask = weight, bias, mask
        self.activation, self.residual = activation, residual

    def length(self, x: Tensor) -> int:
        return x.shape[1]

    def _mask(self, start: int, stop: int) -> Tensor | None:
        """The mask of positions `[start, stop)` (a head of the slice is the slice's own first columns)."""
        return None if self.mask is None else self.mask[:, start:stop].contiguous()

    def head(self, x: Tensor, n: int) -> Tensor:
        return x[:, :n]

    def forward(self, x: Tensor, states: Tensor | None, want_final: bool, cu_seqlens: Tensor | None = None):
        return ops.short_conv_fused(x, self.weight, self.bias, self._mask(0, x.shape[1]), _contig(states),
                                    cu_seqlens, self.activation, self.residual, want_final)

    def backward(self, x: Tensor, states: Tensor | None, dout: Tensor, dfinal: Tensor | None,
                 cu_seqlens: Tensor | None = None):
        return ops.short_conv_fused_bwd(x, self.weight, self.bias, self._mask(0, x.shape[1]), _contig(states),
                                        cu_seqlens, dout.contiguous(), _contig(dfinal), self.activation,
                                        self.residual)

    def _masked(self, cols: Tensor, m: Tensor | None) -> Tensor:
        """`cols` `[B, k, D]` times the mask `[B, k]`, exactly 0 where the mask is 0 (by selection)."""
        if m is None:
            return cols
        m = m.to(cols.dtype).unsqueeze(2)
        return torch.where(m == 0, torch.zeros((), dtype=cols.dtype, device=cols.device), cols * m)

    def tail_columns(self, x: Tensor, k: int, dtype: torch.dtype) -> Tensor:
        t = x.shape[1]
        return self._masked(x[:, t - k:].to(dtype), self._mask(t - k, t)).transpose(1, 2)

    def add_tail_grad(self, dx: Tensor, x: Tensor, grad: Tensor) -> None:
        k = grad.shape[2]
        if k:
            t = dx.shape[1]
            dx[:, t - k:] += self._masked(grad.transpose(1, 2), self._mask(t - k, t)).to(dx.dtype)

    def put_head(self, out: Tensor, head: Tensor) -> None:
        out[:, :head.shape[1]].copy_(head)

    def head_of(self, t: Tensor, n: int) -> Tensor:
        return t[:, :n]
