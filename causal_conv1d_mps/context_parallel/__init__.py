"""Context parallelism: one long sequence split over the ranks of a `torch.distributed` group.

Each rank holds a contiguous slice of the time axis, slices in group-rank order (any lengths, including
empty and shorter than W-1). A causal conv of width W needs the W-1 inputs before a slice (its halo);
these functions fetch them with one collective and send their gradients back in the backward, so that
every rank's outputs, final states and gradients are those of the single-process call on the whole
sequence, sliced. docs/CONTEXT_PARALLEL.md has the semantics, the cost model and measured figures.

    import causal_conv1d_mps.context_parallel as cp
    ctx = cp.ContextParallel(group)                 # None: the default process group
    x_local = cp.shard(x_full, dim=1, context=ctx)  # this rank's slice of [B, T, D]
    y_local = cp.short_conv_fused(x_local, weight, bias, context=ctx)

Conventions (the same on every rank of the group; every rank must call, and backpropagate through,
every context-parallel call, as with any collective):
- `weight`, `bias` and `initial_states` are replicated; their gradients are this rank's partial sums.
  Sum them over the group (DistributedDataParallel / FSDP over the context-parallel ranks, or an
  all-reduce) as for every other parameter of a context-parallel model.
- `initial_states` are the states before the global first position: the first rank reads them (all
  ranks with `cu_seqlens`, where each sequence starts wherever it starts); other ranks may pass None.
- `seq_idx` is this rank's slice of the global `[B, T]` ids; `cu_seqlens` holds global offsets
  (`[N+1]`, 0 to the global length), identical on every rank.
- With `return_final_states`, every rank returns the sequence's final states (for `cu_seqlens`, each
  sequence's), and a gradient on them is honoured from any rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _validate as check
from .. import api
from ..api import _bdt_layout, _contig
from .. import _activation
from . import _exchange
from ._functions import Comm, PackedFunction, RowsFunction
from ._local import ConvSlice, FusedSlice

__all__ = ["ContextParallel", "causal_conv1d", "short_conv_fused", "shard", "slice_bounds"]


@dataclass(frozen=True)
class ContextParallel:
    """Where the time axis is split: a process group (None: the default group) and whether to overlap
    the halo exchange with the interior computation (see docs/CONTEXT_PARALLEL.md for when it pays)."""

    group: dist.ProcessGroup | None = None
    overlap: bool = False

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)


def _context(context) -> ContextParallel:
    if context is None or isinstance(context, dist.ProcessGroup):
        context = ContextParallel(context)
    if not isinstance(context, ContextParallel):
        raise TypeError(f"context: expected a ContextParallel, a ProcessGroup or None, got {type(context).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (e.g. under torchrun)")
    return context


def _comm(context: ContextParallel) -> Comm:
    group = context.group if context.group is not None else dist.group.WORLD
    rank, world = _exchange.group_rank_and_size(group)
    if rank < 0:
        raise ValueError("context: this process is not a member of the context-parallel group")
    return Comm(group, rank, world, bool(context.overlap))


def slice_bounds(length: int, context: ContextParallel | dist.ProcessGroup | None = None) -> tuple[int, int]:
    """`(start, stop)` of this rank's slice of `length` positions (`torch.tensor_split`'s near-equal split)."""
    comm = _comm(_context(context))
    base, extra = divmod(length, comm.world)
    start = comm.rank * base + min(comm.rank, extra)
    return start, start + base + (comm.rank < extra)


def shard(t: Tensor, dim: int, context: ContextParallel | dist.ProcessGroup | None = None) -> Tensor:
    """This rank's contiguous slice of `t` along `dim` (a view; near-equal split in group-rank order)."""
    start, stop = slice_bounds(t.shape[dim], context)
    return t.narrow(dim, start, stop - start)


def global_seq_ids_int32(seq_idx: Tensor) -> Tensor:
    """`seq_idx` as the int32 ids the kernels read, never silently narrowed. The ids are compared across
    ranks, so unlike the single-process op they cannot be renumbered per row: negative int64 ids become -1
    (padding stays padding), and non-negative ones must fit int32, which is checked in eager mode (one
    device-to-host read of the maximum; skipped under torch.compile and CUDA-graph capture)."""
    if seq_idx.dtype != torch.int64 or seq_idx.numel() == 0:
        return seq_idx.to(torch.int32).contiguous()
    ids = torch.where(seq_idx < 0, -1, seq_idx)
    if check.values_checkable(ids):
        top = int(ids.max())
        if top >= 2**31:
            raise ValueError(f"seq_idx: expected ids below 2**31 with context parallelism (they are compared "
                             f"across ranks, so they are not renumbered), got {top}")
    return ids.to(torch.int32).contiguous()


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None, *,
                  seq_idx: Tensor | None = None, initial_states: Tensor | None = None,
                  return_final_states: bool = False,
                  context: ContextParallel | dist.ProcessGroup | None = None):
    """`causal_conv1d_mps.causal_conv1d` on this rank's slice `x` `[B, D, T_local]` of a sequence split
    over `context`'s group. Arguments as there, plus: `seq_idx` `[B, T_local]` is this rank's slice of
    the global ids; `initial_states` `[B, D, W-1]` are read on the first rank. Returns `out`
    `[B, D, T_local]`, or `(out, final_states)` with the sequence's final states on every rank."""
    act = _activation.code(activation)
    width = check.causal_conv1d_inputs(x, weight, bias, seq_idx, initial_states)
    check.same_device(x=x, weight=weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states)
    comm = _comm(_context(context))
    if width == 1:  # no history: nothing crosses a rank boundary
        return api.causal_conv1d(x, weight, bias, activation, seq_idx=seq_idx, initial_states=initial_states,
                                 return_final_states=return_final_states)
    local = ConvSlice(weight.contiguous(), _contig(bias), act)
    seq = None if seq_idx is None else global_seq_ids_int32(seq_idx)
    out, final = RowsFunction.apply(_bdt_layout(x), local.weight, local.bias, _contig(initial_states), seq,
                                    local, return_final_states, comm)
    return (out, final) if return_final_states else out


def short_conv_fused(x: Tensor, weight: Tensor, bias: Tensor | None = None, attention_mask: Tensor | None = None,
                     activation: bool = True, residual: bool = True, *, initial_states: Tensor | None = None,
                     return_final_states: bool = False, cu_seqlens: Tensor | None = None,
                     context: ContextParallel | dist.ProcessGroup | None = None):
    """`causal_conv1d_mps.short_conv_fused` on this rank's slice `x` `[B, T_local, D]` of a sequence split
    over `context`'s group. `attention_mask` is this rank's slice (any accepted form, read with T_local);
    the halo is of the masked input, as the states are. `cu_seqlens` `[N+1]` holds global offsets
    (identical on every rank, B == 1); `initial_states` are `[N, D, W-1]` then (pass them on every rank),
    else `[B, D, W-1]` read on the first rank. Returns `out` `[B, T_local, D]`, or `(out, final_states)`
    with the sequence's (each sequence's) final states on every rank."""
    act = _activation.code(activation, allow_bool=True)
    # cu_seqlens holds offsets of the whole sequence: its form is checked here, not its end (this slice's T)
    width, mask, rows = check.short_conv_fused_inputs(x, weight, bias, attention_mask, initial_states, cu_seqlens,
                                                      offsets_end_at_t=False)
    d = x.shape[2]
    check.same_device(x=x, weight=weight, bias=bias, attention_mask=attention_mask, initial_states=initial_states,
                      cu_seqlens=cu_seqlens)
    comm = _comm(_context(context))
    if width == 1:  # no history: nothing crosses a rank boundary, and states have width 0
        out = api.short_conv_fused(x, weight, bias, attention_mask, activation, residual)
        return (out, x.new_empty(rows, d, 0)) if return_final_states else out
    if x.stride(2) != 1 and d > 1:
        x = x.contiguous()
    local = FusedSlice(weight.contiguous(), _contig(bias), mask, act, bool(residual))
    if cu_seqlens is None:
        out, final = RowsFunction.apply(x, local.weight, local.bias, _contig(initial_states), None, local,
                                        return_final_states, comm)
    else:
        out, final = PackedFunction.apply(x, local.weight, local.bias, _contig(initial_states),
                                          cu_seqlens.contiguous(), local, return_final_states, comm)
    return (out, final) if return_final_states else out
