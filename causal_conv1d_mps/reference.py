"""Plain PyTorch definitions of every op: the CPU path, the fallback on any device, and the readable spec.

Every function here has the signature that docs/BACKENDS.md gives to a backend. Arithmetic is float32
(float64 for float64 inputs); results are cast once to the output dtype. Loops run over the width `W` only.

The one idea used throughout: the *extended input* `xe` (`[B, D, Te]`, or `[B, Te, D]` when that is the
input's memory order) puts the `W-1` state columns in front of each sequence, and `seq_e` `[B, Te]` names
the sequence of every extended column. An output column `j` (`j >= W-1`) is
`bias + sum_k w[k] * xe[j-(W-1)+k]`, a tap counting only where its `seq_e` equals that of `j`. Plain rows,
`seq_idx` rows and `cu_seqlens` packing differ only in how `xe` and `seq_e` are laid out.

Masking is by selection (`torch.where`), never by multiplying with 0: a NaN or Inf outside a sequence
(another packed sequence, a padding position or row, a position whose attention mask is 0) must not reach
it, forward or backward (docs/BACKENDS.md, "NaN containment").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _activation, _window


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class _Extended:
    """An extended input and where the real columns sit in it.

    `xe` keeps time on dimension `tdim` (2: `[B, D, Te]`; 1: `[B, Te, D]`, the fused op's layout), so that
    every tap below reads memory in the order the input already has it.
    """
    xe: Tensor                # the extended input in the accumulation dtype
    tdim: int                 # the time dimension of xe (1 or 2)
    seq_e: Tensor | None      # [B, Te] sequence id of each column, None when every tap counts
    out_cols: Tensor | None   # [T] output column j - (W-1) of each position t; None means t itself
    x_cols: Tensor | None     # [T] extended column of each input position; None means t + W-1
    state_cols: Tensor | None  # [S, W-1] extended columns of each state row; None means the first W-1 of row b
    final_cols: Tensor | None  # [S, W-1] extended columns of each final state; None means the last W-1

    def per_channel(self, v: Tensor) -> Tensor:
        """A `[D]` vector shaped to broadcast over xe."""
        return v[:, None] if self.tdim == 2 else v

    def per_column(self, m: Tensor) -> Tensor:
        """A `[B, n]` per-column tensor shaped to broadcast over xe."""
        return m.unsqueeze(1) if self.tdim == 2 else m.unsqueeze(2)

    def time_major(self, states: Tensor) -> Tensor:
        """`[rows, D, W-1]` states in xe's layout."""
        return states if self.tdim == 2 else states.transpose(1, 2)

    def channel_major(self, cols: Tensor) -> Tensor:
        """Columns taken from xe's layout back to `[rows, D, n]`."""
        return cols if self.tdim == 2 else cols.transpose(1, 2)


def _extend_rows(x: Tensor, tdim: int, initial_states: Tensor | None, seq_idx: Tensor | None,
                 width: int) -> _Extended:
    """One sequence per row (optionally split by seq_idx); states `[B, D, W-1]` in front of each row."""
    ext = _Extended(x, tdim, None, None, None, None, None)
    if initial_states is None:
        shape = list(x.shape)
        shape[tdim] = width - 1
        prefix = x.new_zeros(shape)
    else:
        prefix = ext.time_major(initial_states.to(x.dtype))
    ext.xe = torch.cat([prefix, x], dim=tdim)
    if seq_idx is not None:
        # States belong to the sequence at position 0 of their row.
        b = x.shape[0]
        head = seq_idx[:, :1].expand(b, width - 1) if seq_idx.shape[1] > 0 else seq_idx.new_zeros(b, width - 1)
        ext.seq_e = torch.cat([head, seq_idx], dim=1)
    return ext


def _extend_varlen(x: Tensor, initial_states: Tensor | None, cu_seqlens: Tensor, width: int) -> _Extended:
    """`x` `[1, T, D]` holding N packed sequences: W-1 state columns are inserted in front of each one."""
    _, t, d = x.shape
    n = cu_seqlens.shape[0] - 1
    h = width - 1
    dev = x.device
    cu = cu_seqlens.long()
    pos = torch.arange(t, device=dev)
    seg = torch.searchsorted(cu[1:].contiguous(), pos, right=True)  # sequence of each position
    x_cols = pos + (seg + 1) * h
    j = torch.arange(h, device=dev)
    state_cols = (cu[:-1] + torch.arange(n, device=dev) * h).unsqueeze(1) + j  # [N, W-1]
    final_cols = (cu[1:] + torch.arange(n, device=dev) * h).unsqueeze(1) + j
    te = t + n * h
    xe = x.new_zeros(1, te, d)
    xe[0, x_cols] = x[0]
    if initial_states is not None and h > 0:
        xe[0, state_cols.reshape(-1)] = initial_states.to(x.dtype).transpose(1, 2).reshape(n * h, d)
    seq_e = torch.empty(te, dtype=torch.long, device=dev)
    seq_e[x_cols] = seg
    seq_e[state_cols.reshape(-1)] = torch.arange(n, device=dev).repeat_interleave(h)
    return _Extended(xe, 1, seq_e.unsqueeze(0), x_cols - h, x_cols, state_cols, final_cols)


def _tap_masks(ext: _Extended, width: int, n_out: int) -> list[Tensor | None]:
    """For each tap k, `[B, n_out]`: the output column is a real output of a sequence (not padding, not
    a state column of a packed sequence) and the source column belongs to that same sequence."""
    if ext.seq_e is None:
        return [None] * width
    target = ext.seq_e[:, width - 1:width - 1 + n_out]
    live = target >= 0
    if ext.out_cols is not None:
        is_output = torch.zeros(n_out, dtype=torch.bool, device=target.device)
        is_output[ext.out_cols] = True
        live = live & is_output
    return [(ext.seq_e[:, k:k + n_out] == target) & live for k in range(width)]


def _n_out(ext: _Extended, width: int) -> int:
    return ext.xe.shape[ext.tdim] - (width - 1)


def _conv(ext: _Extended, weight: Tensor, bias: Tensor | None, masks: list) -> Tensor:
    """Pre-activation at every extended output column (xe's layout, `Te-(W-1)` columns)."""
    width = weight.shape[1]
    n_out = _n_out(ext, width)
    acc = None
    for k in range(width):
        tap = ext.xe.narrow(ext.tdim, k, n_out)
        if masks[k] is not None:
            tap = torch.where(ext.per_column(masks[k]), tap, 0)
        w_k = ext.per_channel(weight[:, k])
        if acc is not None:
            acc.addcmul_(tap, w_k)
        elif bias is None:
            acc = tap * w_k
        else:
            acc = torch.addcmul(ext.per_channel(bias), tap, w_k)
    return acc


def _outputs(ext: _Extended, pre_all: Tensor) -> Tensor:
    return pre_all if ext.out_cols is None else pre_all.index_select(ext.tdim, ext.out_cols)


def _final_states(ext: _Extended, width: int) -> Tensor:
    """`[rows, D, W-1]`: the last W-1 columns of each sequence's extended input."""
    if ext.final_cols is None:
        h = width - 1
        return ext.channel_major(ext.xe.narrow(ext.tdim, ext.xe.shape[ext.tdim] - h, h))
    return ext.xe[0][ext.final_cols].transpose(1, 2)  # [N, D, W-1]


def _backward(ext: _Extended, weight: Tensor, masks: list, g: Tensor, dfinal: Tensor | None):
    """From the gradient at the outputs `g` (xe's layout): (dx in xe's layout, dweight, dbias, dstates)."""
    width = weight.shape[1]
    h = width - 1
    tdim = ext.tdim
    n_out = _n_out(ext, width)
    if ext.out_cols is None:
        g_all = g
    else:
        shape = list(g.shape)
        shape[tdim] = n_out
        g_all = g.new_zeros(shape).index_copy_(tdim, ext.out_cols, g)
    reduce_dims = (0, tdim)
    dxe = torch.zeros_like(ext.xe)
    dweight = torch.empty(weight.shape[0], width, dtype=g.dtype, device=g.device)
    for k in range(width):
        tap = ext.xe.narrow(tdim, k, n_out)
        if masks[k] is None:
            gk = g_all
        else:
            counts = ext.per_column(masks[k])
            gk, tap = torch.where(counts, g_all, 0), torch.where(counts, tap, 0)
        dweight[:, k] = (gk * tap).sum(dim=reduce_dims)
        dxe.narrow(tdim, k, n_out).addcmul_(gk, ext.per_channel(weight[:, k]))
    dbias = g.sum(dim=reduce_dims)
    if dfinal is not None and h > 0:
        if ext.final_cols is None:
            dxe.narrow(tdim, dxe.shape[tdim] - h, h).add_(ext.time_major(dfinal.to(dxe.dtype)))
        else:
            dxe[0].index_add_(0, ext.final_cols.reshape(-1),
                              dfinal.to(dxe.dtype).transpose(1, 2).reshape(-1, dxe.shape[2]))
    if ext.x_cols is None:
        dx = dxe.narrow(tdim, h, dxe.shape[tdim] - h)
        dstates = ext.channel_major(dxe.narrow(tdim, 0, h))
    else:
        dx = dxe.index_select(tdim, ext.x_cols)
        dstates = dxe[0][ext.state_cols].transpose(1, 2)
    return dx, dweight, dbias, dstates


# ---------------------------------------------------------------------------------------------------------
# causal_conv1d: (B, D, T), optional seq_idx


def _is_channel_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.transpose(1, 2).is_contiguous()


def _cc_forward(x, weight, bias, seq_idx, initial_states):
    acc = _acc_dtype(x.dtype)
    width = weight.shape[1]
    # Work along the input's own memory order: [B, T, D] for a channel-last view, [B, D, T] otherwise.
    tdim = 1 if _is_channel_last(x) else 2
    xa = (x.transpose(1, 2) if tdim == 1 else x).to(acc)
    ext = _extend_rows(xa, tdim, initial_states, seq_idx, width)
    masks = _tap_masks(ext, width, x.shape[2])
    w = weight.to(acc)
    pre = _conv(ext, w, None if bias is None else bias.to(acc), masks)
    valid = None if seq_idx is None else ext.per_column(seq_idx >= 0)
    return ext, masks, w, pre, valid


def _store_like(x: Tensor, ext: _Extended, y: Tensor) -> Tensor:
    out = torch.empty_like(x)
    out.copy_(y.transpose(1, 2) if ext.tdim == 1 else y)
    return out


def causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, activation: int, return_final_states: bool):
    ext, _, _, pre, valid = _cc_forward(x, weight, bias, seq_idx, initial_states)
    y = _activation.forward(activation, pre)
    if valid is not None:
        y = torch.where(valid, y, 0)
    final = _final_states(ext, weight.shape[1]).to(x.dtype).contiguous() if return_final_states else None
    return _store_like(x, ext, y), final


def causal_conv1d_bwd(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, activation: int):
    ext, masks, w, pre, valid = _cc_forward(x, weight, bias, seq_idx, initial_states)
    g = (dout.transpose(1, 2) if ext.tdim == 1 else dout).to(pre.dtype)
    if activation != _activation.IDENTITY:
        g = g * _activation.derivative(activation, pre)
    if valid is not None:
        g = torch.where(valid, g, 0)  # padding outputs are constants: dout there never flows back
    dx_f, dweight, dbias, dstates = _backward(ext, w, masks, g, dfinal_states)
    return (_store_like(x, ext, dx_f), dweight.to(weight.dtype),
            None if bias is None else dbias.to(bias.dtype),
            None if initial_states is None else dstates.to(initial_states.dtype).contiguous())


# ---------------------------------------------------------------------------------------------------------
# short_conv_fused: (B, T, D), mask, residual, optional cu_seqlens; computed in [B, T, D] order


def _fused_forward(x, weight, bias, mask, initial_states, cu_seqlens):
    acc = _acc_dtype(x.dtype)
    width = weight.shape[1]
    xm = x.to(acc)
    if mask is not None:
        m = mask.to(acc).unsqueeze(2)
        xm = torch.where(m != 0, xm * m, 0)  # a masked-out NaN contributes nothing
    if cu_seqlens is None:
        ext = _extend_rows(xm, 1, initial_states, None, width)
    else:
        ext = _extend_varlen(xm, initial_states, cu_seqlens, width)
    masks = _tap_masks(ext, width, _n_out(ext, width))
    w = weight.to(acc)
    pre = _outputs(ext, _conv(ext, w, None if bias is None else bias.to(acc), masks))
    return ext, masks, w, pre


def _no_sequences(cu_seqlens) -> bool:
    """`cu_seqlens == [0]`: zero packed sequences (and T == 0), so nothing to convolve and no states."""
    return cu_seqlens is not None and cu_seqlens.shape[0] == 1


def short_conv_fused_fwd(x, weight, bias, mask, initial_states, cu_seqlens,
                         activation: int, residual: bool, return_final_states: bool):
    if _no_sequences(cu_seqlens):
        final = x.new_empty(0, x.shape[2], weight.shape[1] - 1) if return_final_states else None
        return x.new_empty(x.shape), final
    ext, _, _, pre = _fused_forward(x, weight, bias, mask, initial_states, cu_seqlens)
    y = _activation.forward(activation, pre, inplace=True)  # pre is not needed again
    if residual:
        y.add_(x)
    out = y.to(x.dtype).contiguous()
    final = _final_states(ext, weight.shape[1]).to(x.dtype).contiguous() if return_final_states else None
    return out, final


def short_conv_fused_bwd(x, weight, bias, mask, initial_states, cu_seqlens, dout, dfinal_states,
                         activation: int, residual: bool):
    if _no_sequences(cu_seqlens):
        return (x.new_empty(x.shape), torch.zeros_like(weight),
                None if bias is None else torch.zeros_like(bias),
                None if initial_states is None else torch.zeros_like(initial_states))
    ext, masks, w, pre = _fused_forward(x, weight, bias, mask, initial_states, cu_seqlens)
    dout_f = dout.to(pre.dtype)
    g = dout_f if activation == _activation.IDENTITY else dout_f * _activation.derivative(activation, pre)
    dx, dweight, dbias, dstates = _backward(ext, w, masks, g, dfinal_states)
    if mask is not None:
        m = mask.to(dx.dtype).unsqueeze(2)
        dx = torch.where(m != 0, dx * m, 0)
    if residual:
        dx = dx + dout_f
    return (dx.to(x.dtype).contiguous(), dweight.to(weight.dtype),
            None if bias is None else dbias.to(bias.dtype),
            None if initial_states is None else dstates.to(initial_states.dtype).contiguous())


# ---------------------------------------------------------------------------------------------------------
# Decode step and varlen states


def _one_token(x0, window, weight, bias, activation: int, residual: bool):
    """The decode step's output for one token per row: `x0` `[B, D]`, `window` `[B, D, W-1]` (the state
    entries it reads, any strides). Tap by tap in place: the general path builds an extended input first,
    which made a CPU decode step slower than eager PyTorch's roll + einsum. At small sizes the cost is
    per-op host time, hence `narrow`/`select` and no dtype casts that would be no-ops."""
    acc = _acc_dtype(x0.dtype)
    w = _as(weight, acc)
    history = w.shape[1] - 1
    pre = _as(x0, acc) * w.select(1, history)
    if bias is not None:
        pre += bias
    for k in range(history):
        pre.addcmul_(_as(window.select(2, k), acc), w.select(1, k))
    y = _activation.forward(activation, pre, inplace=True)
    if residual:
        y += x0
    return _as(y, x0.dtype)


def _as(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def _step_outputs(x, window, weight, bias, activation: int, residual: bool):
    """`[B, L, D]` outputs, in x's dtype, of `L` tokens per row following the state entries `window`
    `[B, D, W-1]` (a new contiguous tensor)."""
    if x.shape[1] == 1:
        return _one_token(x.select(1, 0), window, weight, bias, activation, residual).unsqueeze(1)
    return short_conv_fused_fwd(x, weight, bias, None, window, None, activation, residual, False)[0]


def short_conv_update(x, conv_state, weight, bias, cache_seqlens, conv_state_indices,
                      activation: int, residual: bool):
    """`x` `[B, L, D]`; `conv_state` `[B|N, D, S]` updated in place. Returns `out` like `x`."""
    b = x.shape[0]
    n, _, s = conv_state.shape
    history = weight.shape[1] - 1
    if cache_seqlens is None and conv_state_indices is None:
        # Shift mode with one state row per batch row: the window is a view, read before the state moves.
        y = _step_outputs(x, conv_state.narrow(2, s - history, history), weight, bias, activation, residual)
        _window.shift_in_place(conv_state, x)
        return y if x.is_contiguous() else torch.empty_like(x).copy_(y)  # x's strides, as the op's fake promises
    window = _window.gather_window(conv_state, cache_seqlens, conv_state_indices, history, b)
    y = _step_outputs(x, window, weight, bias, activation, residual)
    rows = _window.valid_rows(conv_state_indices, b, n, x.device)
    out = torch.empty_like(x).copy_(torch.where(rows.view(b, 1, 1), y, 0))
    if b > 0 and s > 0:
        keep = rows.nonzero().squeeze(1)
        slots = keep if conv_state_indices is None else conv_state_indices.long()[keep]
        seqlens = None if cache_seqlens is None else cache_seqlens[keep]
        conv_state[slots] = _window.updated_state(conv_state[slots], x[keep], seqlens)
    return out


def causal_conv1d_varlen_states(x, cu_seqlens, state_len: int):
    """`x` `[total_T, D]` packed; `[N, D, state_len]`: each sequence's last inputs, zero-filled on the left."""
    cu = cu_seqlens.long()
    n = cu.shape[0] - 1
    cols = cu[1:].unsqueeze(1) - state_len + torch.arange(state_len, device=x.device)  # [N, state_len]
    inside = cols >= cu[:-1].unsqueeze(1)
    taken = x[cols.clamp(min=0, max=max(x.shape[0] - 1, 0))] if x.shape[0] > 0 \
        else x.new_zeros(n, state_len, x.shape[1])
    states = torch.where(inside.unsqueeze(2), taken, torch.zeros((), dtype=x.dtype, device=x.device))
    return states.transpose(1, 2).contiguous()
