"""The halo exchange: one all-gather of every rank's last W-1 inputs, and its adjoint (a reduce-scatter).

Why one all-gather and not a send to the next rank: a rank whose slice is shorter than W-1 cannot hand
on a full halo before it has received its own, so point-to-point sends would form a chain of up to
`world` hops. Gathering each rank's own last `h = W-1` columns (with its slice length) lets every rank
assemble its halo at once from the columns of all earlier ranks, in one collective whatever the slice
lengths. The price is `world * B * D * h` values received per rank instead of `B * D * h`; `h` is a
handful of columns, so this stays negligible next to the `B * D * T_local` of the local convolution.

Tails travel in float32 (float64 for float64 inputs): they hold exact copies of the inputs and of the
initial states, whatever their dtypes, so every rank agrees on the message size without knowing the
dtype of another rank's `initial_states`.

Shapes: a tail and a halo are `[B, D, h]` (channel-major, like the ops' states), columns oldest first.
All index arithmetic stays on the device (no host synchronisation, static shapes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor


# torch 2.13 renamed the functional collectives (the old names warn); older releases have only the old ones.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


def transfer_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_bytes(t: Tensor) -> Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@dataclass
class Gathered:
    """What every rank sent: `tails` `[P, B, D, h]`, `ids` `[P, B, h]` int32 or None, `lengths` `[P]` int64."""
    tails: Tensor
    ids: Tensor | None
    lengths: Tensor


class PendingGather:
    """An all-gather in flight: started by `start_gather`, unpacked (waited for) by `result`."""

    def __init__(self, raw: Tensor, world: int, tail: Tensor, ids: Tensor | None):
        self._raw, self._world = raw, world
        self._tail_shape, self._tail_dtype = tuple(tail.shape), tail.dtype
        self._tail_bytes = tail.numel() * tail.element_size()
        self._ids_shape = None if ids is None else tuple(ids.shape)

    def result(self) -> Gathered:
        rows = funcol.wait_tensor(self._raw).view(self._world, -1)
        end = self._tail_bytes
        tails = rows[:, :end].contiguous().view(self._tail_dtype).view(self._world, *self._tail_shape)
        ids = None
        if self._ids_shape is not None:
            n_ids = 4 * self._ids_shape[0] * self._ids_shape[1]
            ids = rows[:, end:end + n_ids].contiguous().view(torch.int32).view(self._world, *self._ids_shape)
            end += n_ids
        lengths = rows[:, end:end + 8].contiguous().view(torch.int64).view(self._world)
        return Gathered(tails, ids, lengths)


def start_gather(tail: Tensor, ids: Tensor | None, length: int, group, world: int) -> PendingGather:
    """Starts the all-gather of this rank's `tail` `[B, D, h]`, `ids` `[B, h]` int32 and slice length."""
    parts = [_as_bytes(tail)]
    if ids is not None:
        parts.append(_as_bytes(ids.to(torch.int32)))
    parts.append(_as_bytes(torch.full((1,), length, dtype=torch.int64, device=tail.device)))
    raw = _all_gather(torch.cat(parts), 0, group)
    return PendingGather(raw, world, tail, ids)


def own_tail(x_cols: Tensor, prefix: Tensor | None, h: int) -> Tensor:
    """This rank's message `[B, D, h]`: the last h columns of `[prefix, x_cols]` (left-padded with zeros).

    `x_cols` `[B, D, k]` (k = min(T, h)) are the last inputs of the slice in the transfer dtype; `prefix`
    `[B, D, h]` is the first rank's initial states (zeros when none), None on other ranks."""
    b, d, k = x_cols.shape
    parts = [x_cols] if prefix is None else [prefix, x_cols]
    if prefix is None and k < h:
        parts.insert(0, x_cols.new_zeros(b, d, h - k))
    return torch.cat(parts, dim=2)[:, :, -h:]  # h >= 1: W == 1 never exchanges


def own_tail_ids(seq_idx: Tensor, h: int) -> Tensor:
    """`[B, h]` int32: the sequence ids of this rank's tail columns (0 where the column is not an input)."""
    b, t = seq_idx.shape
    k = min(t, h)
    return torch.cat([seq_idx.new_zeros(b, h - k), seq_idx[:, t - k:]], dim=1).to(torch.int32)


@dataclass
class Halo:
    """This rank's halo and where each column came from (for the backward)."""
    values: Tensor            # [B, D, h] transfer dtype: the h inputs before this rank's first position
    ids: Tensor | None        # [B, h] int32 sequence id of each halo column (seq_idx mode)
    source: Tensor | None     # [h] int64 tail column (rank q, column c) it was taken from, as q * h + c
    found: Tensor | None      # [h] bool: False where it reaches before the global start (zeros); None: all
    offset: Tensor            # [] int64: this rank's first global position (sum of earlier slice lengths)


def assemble(gathered: Gathered, rank: int, h: int, prefix_mode: bool, own_prefix: Tensor | None,
             own_first_id: Tensor | None) -> Halo:
    """The halo of `rank`: the inputs at the h global positions before its first one, oldest first.

    Position `p` lies in the slice of the rank `q` whose end is the first one past `p`, and in `q`'s tail
    at column `p - end_q + h` (every slice ends where the next begins). In prefix mode the first rank's
    tail starts with the initial states, at positions `-h..-1`; otherwise positions before 0 hold zeros.
    On the first rank the halo is its own prefix. `own_first_id` `[B]` (seq_idx mode) names the sequence
    of this rank's first position; the initial states belong to the sequence of the global first one."""
    offset = gathered.lengths[:rank].sum()
    if rank == 0:
        ids = None if own_first_id is None else own_first_id.unsqueeze(1).expand(-1, h).contiguous()
        return Halo(own_prefix, ids, None, None, offset)
    ends = gathered.lengths[:rank].cumsum(0)                                  # [r] end of each earlier slice
    position = offset - h + torch.arange(h, device=ends.device)               # [h]
    owner = torch.searchsorted(ends, position, right=True)                    # position < 0: the first rank
    column = (position - ends.index_select(0, owner) + h).clamp(0, h - 1)
    values = gathered.tails[owner, :, :, column].permute(1, 2, 0)             # [B, D, h]
    found = None
    if not prefix_mode:
        found = position >= 0
        values = torch.where(found, values, torch.zeros((), dtype=values.dtype, device=values.device))
    ids = None
    if gathered.ids is not None:
        # The global first position's id: in the tail of the first non-empty rank when it comes before us.
        first_owner = torch.searchsorted(ends, torch.zeros_like(offset), right=True).clamp(max=rank - 1)
        first_column = (h - ends[first_owner]).clamp(0, h - 1)
        first_id = torch.where(offset > 0, gathered.ids[first_owner, :, first_column], own_first_id)
        ids = torch.where((position < 0).unsqueeze(0), first_id.unsqueeze(1),
                          gathered.ids[owner, :, column].t())
    return Halo(values, ids, owner * h + column, found, offset)


def halo_grad_message(dhalo: Tensor, halo: Halo, rank: int, world: int, h: int) -> Tensor:
    """The reduce-scatter input `[P * B * D * h]`: `dhalo` `[B, D, h]` routed back to the tail columns
    of the ranks it came from (zeros for this rank and later ones)."""
    b, d = dhalo.shape[0], dhalo.shape[1]
    msg = dhalo.new_zeros(b, d, world * h + 1)
    # Columns from before the global start (and all of the first rank's, which it keeps) go to a dump
    # column; the first rank adds there too, so that its message depends on its backward like any other's.
    dump = torch.full((h,), world * h, dtype=torch.int64, device=dhalo.device)
    if rank == 0:
        index = dump
    else:
        index = halo.source if halo.found is None else torch.where(halo.found, halo.source, dump)
    msg.index_add_(2, index, dhalo)
    return msg[:, :, :world * h].reshape(b, d, world, h).permute(2, 0, 1, 3).reshape(-1)


def start_reduce_scatter(message: Tensor, group) -> Tensor:
    """Starts the reduce-scatter: each rank receives the sum of the gradients sent to its tail."""
    return _reduce_scatter(message, "sum", 0, group)


def finish_reduce_scatter(pending: Tensor, like: Tensor) -> Tensor:
    return funcol.wait_tensor(pending).view(like.shape)


def after(t: Tensor, dependency: Tensor) -> Tensor:
    """`t` unchanged, but computed from `dependency` too.

    Collectives must run in the same order on every rank. Eager code issues them in program order; a
    compiler orders them by data dependencies, and a collective whose input does not depend on the
    previous one's result (e.g. on a rank that owns no final states) could be issued first on one rank
    and second on another. The flag below is always true and exact (no arithmetic reaches `t`)."""
    flag = torch.isnan(dependency.reshape(-1)[:1].float()).sum() >= 0
    return torch.where(flag, t, torch.zeros((), dtype=t.dtype, device=t.device))


def all_reduce_sum(t: Tensor, group) -> Tensor:
    return funcol.wait_tensor(funcol.all_reduce(t.contiguous(), "sum", group))


def group_rank_and_size(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)
