"""Index arithmetic of the decode-step state, shared by the reference path and the decode step's autograd
route in `ops.py`.

Plain PyTorch, no kernels: which state columns a decode step reads, and what the state holds afterwards.
"""
from __future__ import annotations

import torch
from torch import Tensor


def valid_rows(conv_state_indices: Tensor | None, batch: int, num_states: int, device) -> Tensor:
    """`[B]` bool: rows that own a state slot (negative or out-of-range indices are padding)."""
    if conv_state_indices is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    idx = conv_state_indices.long()
    return (idx >= 0) & (idx < num_states)


def window_columns(cache_seqlens: Tensor | None, state_len: int, history: int, batch: int, device) -> Tensor:
    """`[B, history]` int64: the state columns holding the `history` inputs before the step, oldest first.
    Circular positions are taken modulo S here too (Python's modulo), whatever range they arrive in."""
    offsets = torch.arange(-history, 0, device=device)
    if cache_seqlens is None:  # shift mode: the newest input is the last column
        return (state_len + offsets).expand(batch, history)
    return torch.remainder(cache_seqlens.long().unsqueeze(1) + offsets, state_len)


def gather_window(conv_state: Tensor, cache_seqlens: Tensor | None, conv_state_indices: Tensor | None,
                  history: int, batch: int) -> Tensor:
    """`[B, D, history]` copy of the inputs before the step; zeros for padding rows."""
    n, d, s = conv_state.shape
    rows = valid_rows(conv_state_indices, batch, n, conv_state.device)
    slot = torch.arange(batch, device=conv_state.device) if conv_state_indices is None \
        else conv_state_indices.long().clamp(0, max(n - 1, 0))
    cols = window_columns(cache_seqlens, s, history, batch, conv_state.device)
    if n == 0 or history == 0:
        return conv_state.new_zeros(batch, d, history)
    window = conv_state[slot.unsqueeze(1), :, cols]  # [B, history, D]
    # selected, not multiplied: a padding row's window is 0 even where the slot it clamps to holds NaN
    window = torch.where(rows.view(batch, 1, 1), window.transpose(1, 2), 0)
    return window.contiguous()


def shift_in_place(state: Tensor, x_bld: Tensor) -> None:
    """Shift mode, in place: `state` `[B, D, S]` keeps its last `S - L` columns, moved to the front, followed
    by the `L` inputs `x_bld` `[B, L, D]` (their last S when `L >= S`). The overlapping move goes through a
    temporary; it reads and writes about half the bytes of building the new state and copying it back."""
    s, length = state.shape[2], x_bld.shape[1]
    keep = max(s - length, 0)
    if keep > 0:
        state.narrow(2, 0, keep).copy_(state.narrow(2, length, keep).clone())
    new = min(length, s)
    state.narrow(2, keep, new).copy_(x_bld.narrow(1, length - new, new).transpose(1, 2))


def updated_state(old_rows: Tensor, x_bld: Tensor, cache_seqlens: Tensor | None) -> Tensor:
    """The state rows `[B, D, S]` after appending the `L` inputs `x_bld` `[B, L, D]`."""
    b, d, s = old_rows.shape
    length = x_bld.shape[1]
    new_inputs = x_bld.transpose(1, 2).to(old_rows.dtype)
    if cache_seqlens is None:  # shift left by L, append
        return torch.cat([old_rows, new_inputs], dim=2)[:, :, -s:] if s > 0 else old_rows.clone()
    # Circular: column p receives input i = q + S*m (q = (p - start) mod S), the last such i < L wins.
    start = cache_seqlens.long().view(b, 1)
    q = torch.remainder(torch.arange(s, device=old_rows.device).view(1, s) - start, s)  # [B, S]
    written = q < length
    last = q + s * torch.div(length - 1 - q, s, rounding_mode="floor").clamp(min=0)
    last = torch.where(written, last, torch.zeros_like(last))
    taken = torch.gather(new_inputs, 2, last.unsqueeze(1).expand(b, d, s)) if length > 0 else old_rows
    return torch.where(written.unsqueeze(1), taken, old_rows)
