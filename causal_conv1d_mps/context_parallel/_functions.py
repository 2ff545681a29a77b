"""The context-parallel autograd functions: halo in, local convolution, halo gradient back.

Every rank holds a contiguous slice of the time axis, in group-rank order. Forward: one all-gather of each
rank's last `h = W-1` conv inputs (`_exchange.py`) gives every rank the `h` inputs before its slice (its
halo), which the local op takes as initial states. Backward: the local op's gradient on those initial
states is the halo's gradient; one reduce-scatter returns it to the ranks whose inputs it came from, where
it is added to `dx` (and, on the first rank, to the initial states' gradient).

Three modes:
- rows (no `seq_idx`, no `cu_seqlens`): the halo is the states of one local call. With `overlap`, the
  interior (every output from position h on, which needs no halo) is computed while the gather is in
  flight, then the first h outputs are recomputed from the halo (a small call) and written in place.
- `seq_idx` (`causal_conv1d`): the halo joins the first h positions of the slice in a small window call
  that carries the halo's sequence ids, so the op's own selection excludes columns of other sequences;
  the rest comes from a call without states. Exact for any id pattern.
- `cu_seqlens` (`short_conv_fused`, global offsets): each sequence gets its own initial states, built
  from its `initial_states` row and the halo columns that belong to it (selection, never `* 0`).

Final states: every rank returns the sequence's final states (those of the last rank's slice end, or
for `cu_seqlens` of the rank holding each sequence's last token), spread by an all-reduce of selected
values; their gradients are summed over ranks and enter the backward of the rank that owns them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _exchange as ex


@dataclass(frozen=True)
class Comm:
    group: object
    rank: int
    world: int
    overlap: bool


def _owned(local: Tensor, owner, group, gathered_lengths: Tensor) -> Tensor:
    """Every rank gets the owner's `local` (per row where `owner` is a tensor): an all-reduce of the owner's
    values and exact zeros elsewhere (selected, so a NaN on a non-owner goes nowhere). Issued after the
    halo's all-gather on every rank (see `_exchange.after`)."""
    zero = torch.zeros((), dtype=local.dtype, device=local.device)
    if isinstance(owner, Tensor):
        mine = torch.where(owner.view(-1, 1, 1), local, zero)
    else:
        mine = local if owner else torch.zeros_like(local)
    return ex.all_reduce_sum(ex.after(mine, gathered_lengths), group)


def _final_grad(ctx, dfinal: Tensor | None, like_shape, dtype, device) -> tuple[Tensor | None, Tensor | None]:
    """The gradient on this rank's own final states (the sum over ranks of the gradients on the shared
    final states, kept where this rank owns them), and that sum (None, None without final states)."""
    if not ctx.want_final:
        return None, None
    if dfinal is None:
        dfinal = torch.zeros(like_shape, dtype=dtype, device=device)
    total = ex.all_reduce_sum(dfinal, ctx.comm.group)
    owner = ctx.final_owner
    if isinstance(owner, Tensor):
        zero = torch.zeros((), dtype=total.dtype, device=total.device)
        return torch.where(owner.view(-1, 1, 1), total, zero), total
    return (total if owner else None), total


def _send_halo_grad(previous: Tensor | None, dhalo: Tensor, halo: ex.Halo, comm: Comm, h: int) -> Tensor:
    """Starts the reduce-scatter of the halo's gradient, after `previous` (the final states' all-reduce)."""
    message = ex.halo_grad_message(dhalo, halo, comm.rank, comm.world, h)
    if previous is not None:
        message = ex.after(message, previous)
    return ex.start_reduce_scatter(message, comm.group)


def _apply_received(local, dx: Tensor, x: Tensor, received: Tensor, t: int, h: int,
                    dinit: Tensor | None, prefix_mode: bool, rank: int) -> None:
    """Adds the gradient that later ranks sent to this rank's tail columns: onto `dx`'s last inputs and,
    on the first rank in prefix mode, onto the initial states (`dinit` `[B, D, h]`, in place)."""
    k = min(t, h)
    local.add_tail_grad(dx, x, received[:, :, h - k:])
    if prefix_mode and rank == 0 and t < h and dinit is not None:
        dinit[:, :, t:] += received[:, :, :h - t].to(dinit.dtype)


# ---------------------------------------------------------------------------------------------------------
# rows and seq_idx modes (both ops in rows mode; seq_idx for causal_conv1d)


def _window_inputs(x: Tensor, seq_idx: Tensor, halo: ex.Halo, m: int):
    """The seq_idx window `[B, D, h+m]`: the halo then the slice's first m inputs, with their ids."""
    xw = torch.cat([halo.values, x[:, :, :m].to(halo.values.dtype)], dim=2)
    sw = torch.cat([halo.ids, seq_idx[:, :m].to(torch.int32)], dim=1).contiguous()
    return xw, sw


class RowsFunction(torch.autograd.Function):
    """Context-parallel conv over rows (`local` is a `ConvSlice` or `FusedSlice`), optionally with seq_idx.

    forward(x, weight, bias, initial_states, seq_idx, local, want_final, comm) -> (out, final_states)
    The adapter `local` carries weight, bias and the op's flags; weight and bias are inputs here only so
    that autograd routes their gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_states, seq_idx, local, want_final: bool, comm: Comm):
        ctx.set_materialize_grads(False)
        h = weight.shape[1] - 1
        t = local.length(x)
        b, d = x.shape[0], weight.shape[0]
        tdt = ex.transfer_dtype(x)
        prefix = None
        if comm.rank == 0:
            prefix = (initial_states.to(tdt) if initial_states is not None
                      else x.new_zeros(b, d, h, dtype=tdt))
        tail = ex.own_tail(local.tail_columns(x, min(t, h), tdt), prefix, h)
        ids_tail = None if seq_idx is None else ex.own_tail_ids(seq_idx, h)
        pending = ex.start_gather(tail, ids_tail, t, comm.group, comm.world)
        split = seq_idx is not None or comm.overlap
        out = final = None
        if split and t > h:  # the interior: outputs from position h on read no halo
            out, final = local.forward(x, None, want_final, seq_idx)
        first_id = None
        if seq_idx is not None:
            first_id = seq_idx[:, 0].to(torch.int32) if t > 0 else seq_idx.new_zeros(b, dtype=torch.int32)
        gathered = pending.result()
        halo = ex.assemble(gathered, comm.rank, h, True, prefix, first_id)
        m = min(t, h)
        if seq_idx is not None:
            xw, sw = _window_inputs(x, seq_idx, halo, m)
            out_w, final_w = local.forward(xw, None, want_final, sw)
            if out is None:
                out = torch.empty_like(x)
                final = final_w.to(x.dtype) if want_final else final_w
            out[:, :, :m].copy_(out_w[:, :, h:])
        elif split and t > h:
            out_w, _ = local.forward(local.head(x, h), halo.values, False)
            local.put_head(out, out_w)
        else:
            out, final = local.forward(x, halo.values, want_final)
        ctx.final_owner = comm.rank == comm.world - 1
        if want_final:
            final = _owned(final, ctx.final_owner, comm.group, gathered.lengths)
        ctx.save_for_backward(x, weight, bias, initial_states, seq_idx, halo.values, halo.ids, halo.source,
                              halo.found)
        ctx.local, ctx.want_final, ctx.comm, ctx.h = local, want_final, comm, h
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        x, weight, bias, initial_states, seq_idx, values, ids, source, found = ctx.saved_tensors
        local, comm, h = ctx.local, ctx.comm, ctx.h
        halo = ex.Halo(values, ids, source, found, None)
        t = local.length(x)
        m = min(t, h)
        if dout is None:
            dout = torch.zeros_like(x)
        dfinal, dfinal_total = _final_grad(ctx, dfinal, (x.shape[0], weight.shape[0], h), x.dtype, x.device)
        if seq_idx is not None:
            dx, dweight, dbias, dhalo, pending = _seq_backward(dfinal_total, local, x, seq_idx, halo, dout, dfinal,
                                                               t, h, m, comm)
        else:
            dhalo = None
            if comm.overlap and t > h:  # the halo's gradient first, so that its exchange overlaps the rest
                head = local.head(x, h)
                dhalo = local.backward(head, values, local.head_of(dout, h), None)[3]
                pending = _send_halo_grad(dfinal_total, dhalo, halo, comm, h)
            dx, dweight, dbias, dstates = local.backward(x, values, dout, dfinal)
            if dhalo is None:
                dhalo = dstates
                pending = _send_halo_grad(dfinal_total, dhalo, halo, comm, h)
        received = ex.finish_reduce_scatter(pending, values)
        dinit = None
        if initial_states is not None:
            dinit = dhalo.clone() if comm.rank == 0 else torch.zeros_like(dhalo)
        _apply_received(local, dx, x, received, t, h, dinit, True, comm.rank)
        if dinit is not None:
            dinit = dinit.to(initial_states.dtype)
        return (dx, dweight, dbias if bias is not None else None, dinit, None, None, None, None)


def _seq_backward(dfinal_total, local, x, seq_idx, halo: ex.Halo, dout, dfinal, t: int, h: int, m: int, comm: Comm):
    """seq_idx mode: the window (halo + first m positions) gives the halo's gradient first; the interior
    call, with the window's outputs zeroed in its `dout`, gives the rest."""
    xw, sw = _window_inputs(x, seq_idx, halo, m)
    b, d = xw.shape[0], xw.shape[1]
    head = dout[:, :, :m].to(xw.dtype)
    dout_w = torch.cat([head.new_zeros(b, d, h), head], dim=2)
    dfinal_w = None if (dfinal is None or t > h) else dfinal.to(xw.dtype)
    dxw, dweight_w, dbias_w, _ = local.backward(xw, None, dout_w, dfinal_w, sw)
    dhalo = dxw[:, :, :h].contiguous()
    pending = _send_halo_grad(dfinal_total, dhalo, halo, comm, h)
    if t <= h:
        dx = torch.empty_like(x).copy_(dxw[:, :, h:])
        return dx, dweight_w, dbias_w, dhalo, pending
    dout_z = torch.empty_like(x).copy_(dout)
    dout_z[:, :, :m] = 0
    dx, dweight, dbias, _ = local.backward(x, None, dout_z, dfinal, seq_idx)
    dx[:, :, :m] += dxw[:, :, h:].to(dx.dtype)
    dweight = (dweight.float() + dweight_w.float()).to(dweight.dtype)
    if dbias.numel():
        dbias = (dbias.float() + dbias_w.float()).to(dbias.dtype)
    return dx, dweight, dbias, dhalo, pending


# ---------------------------------------------------------------------------------------------------------
# cu_seqlens mode (short_conv_fused, packed sequences with global offsets)


def _sequence_states(halo: ex.Halo, initial_states: Tensor | None, cu: Tensor, h: int, n: int, d: int):
    """Per-sequence initial states `[N, D, h]` of this rank's local call.

    A sequence that started before this rank's first position (`before = offset - start > 0` of its
    inputs already seen) continues from the halo, whose columns older than its start are replaced by the
    matching columns of its own initial states (zeros when none). Other sequences start from their own
    initial states. Returns the states and, per (sequence, column), whether the column comes from
    the sequence's initial states (else from the halo) and which initial-state column it is."""
    before = (halo.offset - cu[:-1]).clamp(min=0)                               # [N]
    col = before.unsqueeze(1) + torch.arange(h, device=cu.device)               # [N, h] extended column
    from_init = col < h
    index = col.clamp(max=max(h - 1, 0)).unsqueeze(1).expand(n, d, h)
    if initial_states is None:
        init_part = halo.values.new_zeros(n, d, h)
    else:
        init_part = initial_states.to(halo.values.dtype).gather(2, index)
    states = torch.where(from_init.unsqueeze(1), init_part, halo.values.expand(n, d, h))
    return states, from_init, index


class PackedFunction(torch.autograd.Function):
    """Context-parallel `short_conv_fused` with `cu_seqlens` in global offsets (B == 1).

    forward(x, weight, bias, initial_states, cu_seqlens, local, want_final, comm) -> (out, final_states)"""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_states, cu_seqlens, local, want_final: bool, comm: Comm):
        ctx.set_materialize_grads(False)
        h = weight.shape[1] - 1
        t = local.length(x)
        d = weight.shape[0]
        n = cu_seqlens.shape[0] - 1
        tdt = ex.transfer_dtype(x)
        tail = ex.own_tail(local.tail_columns(x, min(t, h), tdt), None, h)
        pending = ex.start_gather(tail, None, t, comm.group, comm.world)
        zeros = x.new_zeros(1, d, h, dtype=tdt)
        gathered = pending.result()
        halo = ex.assemble(gathered, comm.rank, h, False, zeros, None)
        cu = cu_seqlens.to(torch.int64)
        local_cu = (cu - halo.offset).clamp(min=0, max=t).to(torch.int32)
        states, from_init, index = _sequence_states(halo, initial_states, cu, h, n, d)
        out, final = local.forward(x, states, want_final, local_cu)
        # A sequence's final states live on the rank holding its last input; an empty one's on rank 0.
        ends_here = (cu[1:] > halo.offset) & (cu[1:] <= halo.offset + t)
        owner = torch.where(cu[1:] == cu[:-1], torch.full_like(ends_here, comm.rank == 0), ends_here)
        ctx.final_owner = owner
        if want_final:
            final = _owned(final, owner, comm.group, gathered.lengths)
        ctx.save_for_backward(x, weight, bias, initial_states, local_cu, states, from_init, index,
                              halo.values, halo.source, halo.found)
        ctx.local, ctx.want_final, ctx.comm, ctx.h = local, want_final, comm, h
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        (x, weight, bias, initial_states, local_cu, states, from_init, index, values, source,
         found) = ctx.saved_tensors
        local, comm, h = ctx.local, ctx.comm, ctx.h
        n, d = states.shape[0], states.shape[1]
        if dout is None:
            dout = torch.zeros_like(x)
        dfinal, dfinal_total = _final_grad(ctx, dfinal, (n, d, h), x.dtype, x.device)
        dx, dweight, dbias, dstates = local.backward(x, states, dout, dfinal, local_cu)
        zero = torch.zeros((), dtype=dstates.dtype, device=dstates.device)
        from_init3 = from_init.unsqueeze(1)
        dhalo = torch.where(from_init3, zero, dstates).sum(dim=0, keepdim=True)
        halo = ex.Halo(values, None, source, found, None)
        pending = _send_halo_grad(dfinal_total, dhalo, halo, comm, h)
        dinit = None
        if initial_states is not None:
            dinit = torch.zeros_like(dstates).scatter_add_(2, index, torch.where(from_init3, dstates, zero))
        received = ex.finish_reduce_scatter(pending, values)
        _apply_received(local, dx, x, received, local.length(x), h, None, False, comm.rank)
        if dinit is not None:
            dinit = dinit.to(initial_states.dtype)
        return (dx, dweight, dbias if bias is not None else None, dinit, None, None, None, None)
