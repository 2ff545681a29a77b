"""Plain PyTorch definitions of every op: the CPU path, the fallback on any device, and the readable spec.

Every function here has the signature that docs/BACKENDS.md gives to a backend. Arithmetic is float32
(float64 for float64 inputs); results are cast once to the output dtype. Loops run over the width `W` only.

The one idea used throughout: the *extended input* `xe` `[B, D, Te]` puts the `W-1` state columns in front of
each sequence, and `seq_e` `[B, Te]` names the sequence of every extended column. An output column `j`
(`j >= W-1`) is `bias + sum_k w[k] * xe[j-(W-1)+k]`, a tap counting only where its `seq_e` equals that of
`j`. Plain rows, `seq_idx` rows and `cu_seqlens` packing differ only in how `xe` and `seq_e` are laid out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _window


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class _Extended:
    """An extended input and where the real columns sit in it."""
    xe: Tensor                # [B, D, Te] in the accumulation dtype
    seq_e: Tensor | None      # [B, Te] sequence id of each column, None when every tap counts
    out_cols: Tensor | None   # [T] output column j - (W-1) of each position t; None means t itself
    x_cols: Tensor | None     # [T] extended column of each input position; None means t + W-1
    state_cols: Tensor | None  # [S, W-1] extended columns of each state row; None means the first W-1 of row b
    final_cols: Tensor | None  # [S, W-1] extended columns of each final state; None means the last W-1


def _extend_rows(x: Tensor, initial_states: Tensor | None, seq_idx: Tensor | None, width: int) -> _Extended:
    """One sequence per row (optionally split by seq_idx); states `[B, D, W-1]` in front of each row."""
    b, d, _ = x.shape
    if initial_states is None:
        prefix = x.new_zeros(b, d, width - 1)
    else:
        prefix = initial_states.to(x.dtype)
    xe = torch.cat([prefix, x], dim=2)
    seq_e = None
    if seq_idx is not None:
        # States belong to the sequence at position 0 of their row.
        head = seq_idx[:, :1].expand(b, width - 1) if seq_idx.shape[1] > 0 else seq_idx.new_zeros(b, width - 1)
        seq_e = torch.cat([head, seq_idx], dim=1)
    return _Extended(xe, seq_e, None, None, None, None)


def _extend_varlen(x: Tensor, initial_states: Tensor | None, cu_seqlens: Tensor, width: int) -> _Extended:
    """`B == 1` holding N packed sequences: W-1 state columns are inserted in front of each sequence."""
    _, d, t = x.shape
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
    xe = x.new_zeros(1, d, te)
    xe[:, :, x_cols] = x
    if initial_states is not None and h > 0:
        xe[0][:, state_cols.reshape(-1)] = initial_states.to(x.dtype).permute(1, 0, 2).reshape(d, n * h)
    seq_e = torch.empty(te, dtype=torch.long, device=dev)
    seq_e[x_cols] = seg
    seq_e[state_cols.reshape(-1)] = torch.arange(n, device=dev).repeat_interleave(h)
    return _Extended(xe, seq_e.unsqueeze(0), x_cols - h, x_cols, state_cols, final_cols)


def _tap_masks(seq_e: Tensor | None, width: int, n_out: int) -> list[Tensor | None]:
    """For each tap k, where the source column shares the output column's sequence `[B, n_out]`."""
    if seq_e is None:
        return [None] * width
    target = seq_e[:, width - 1:width - 1 + n_out]
    return [seq_e[:, k:k + n_out] == target for k in range(width)]


def _conv(ext: _Extended, weight: Tensor, bias: Tensor | None, masks: list) -> Tensor:
    """Pre-activation at every extended output column `[B, D, Te-(W-1)]`."""
    width = weight.shape[1]
    n_out = ext.xe.shape[2] - (width - 1)
    acc = ext.xe.new_zeros(ext.xe.shape[0], ext.xe.shape[1], n_out)
    for k in range(width):
        tap = ext.xe[:, :, k:k + n_out]
        if masks[k] is not None:
            tap = tap * masks[k].unsqueeze(1)
        acc = acc + weight[:, k, None] * tap
    if bias is not None:
        acc = acc + bias[:, None]
    return acc


def _outputs(ext: _Extended, pre_all: Tensor) -> Tensor:
    return pre_all if ext.out_cols is None else pre_all[:, :, ext.out_cols]


def _final_states(ext: _Extended, width: int) -> Tensor:
    if ext.final_cols is None:
        return ext.xe[:, :, ext.xe.shape[2] - (width - 1):]
    return ext.xe[0][:, ext.final_cols].permute(1, 0, 2)  # [N, D, W-1]


def _silu_grad(pre: Tensor) -> Tensor:
    sig = torch.sigmoid(pre)
    return sig * (1 + pre * (1 - sig))


def _backward(ext: _Extended, weight: Tensor, masks: list, g: Tensor, dfinal: Tensor | None):
    """From the gradient at the outputs `g` `[B, D, T]`: (dx `[B, D, T]`, dweight, dbias, dstates)."""
    width = weight.shape[1]
    h = width - 1
    b, d, te = ext.xe.shape
    n_out = te - h
    if ext.out_cols is None:
        g_all = g
    else:
        g_all = g.new_zeros(b, d, n_out)
        g_all[:, :, ext.out_cols] = g
    dxe = torch.zeros_like(ext.xe)
    dweight = torch.empty(d, width, dtype=g.dtype, device=g.device)
    for k in range(width):
        gk = g_all if masks[k] is None else g_all * masks[k].unsqueeze(1)
        dweight[:, k] = (gk * ext.xe[:, :, k:k + n_out]).sum(dim=(0, 2))
        dxe[:, :, k:k + n_out] += weight[:, k, None] * gk
    dbias = g.sum(dim=(0, 2))
    if dfinal is not None and h > 0:
        if ext.final_cols is None:
            dxe[:, :, te - h:] += dfinal.to(dxe.dtype)
        else:
            dxe[0].index_add_(1, ext.final_cols.reshape(-1),
                              dfinal.to(dxe.dtype).permute(1, 0, 2).reshape(d, -1))
    if ext.x_cols is None:
        dx, dstates = dxe[:, :, h:], dxe[:, :, :h]
    else:
        dx = dxe[:, :, ext.x_cols]
        dstates = dxe[0][:, ext.state_cols].permute(1, 0, 2)
    return dx, dweight, dbias, dstates


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


# ---------------------------------------------------------------------------------------------------------
# causal_conv1d: (B, D, T), optional seq_idx


def _cc_forward(x, weight, bias, seq_idx, initial_states, silu):
    acc = _acc_dtype(x.dtype)
    width = weight.shape[1]
    ext = _extend_rows(x.to(acc), initial_states, seq_idx, width)
    masks = _tap_masks(ext.seq_e, width, x.shape[2])
    w = weight.to(acc)
    pre = _conv(ext, w, None if bias is None else bias.to(acc), masks)
    valid = None if seq_idx is None else (seq_idx >= 0).unsqueeze(1)
    return ext, masks, w, pre, valid


def causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, silu: bool, return_final_states: bool):
    ext, _, _, pre, valid = _cc_forward(x, weight, bias, seq_idx, initial_states, silu)
    y = torch.nn.functional.silu(pre) if silu else pre
    if valid is not None:
        y = y * valid
    out = torch.empty_like(x)
    out.copy_(y)
    final = _final_states(ext, weight.shape[1]).to(x.dtype).contiguous() if return_final_states else _empty(x)
    return out, final


def causal_conv1d_bwd(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, silu: bool):
    ext, masks, w, pre, valid = _cc_forward(x, weight, bias, seq_idx, initial_states, silu)
    g = dout.to(pre.dtype)
    if valid is not None:
        g = g * valid
    if silu:
        g = g * _silu_grad(pre)
    dx_f, dweight, dbias, dstates = _backward(ext, w, masks, g, dfinal_states)
    dx = torch.empty_like(x)
    dx.copy_(dx_f)
    return (dx, dweight.to(weight.dtype),
            _empty(x) if bias is None else dbias.to(bias.dtype),
            _empty(x) if initial_states is None else dstates.to(initial_states.dtype).contiguous())


# ---------------------------------------------------------------------------------------------------------
# short_conv_fused: (B, T, D), mask, residual, optional cu_seqlens


def _fused_forward(x, weight, bias, mask, initial_states, cu_seqlens):
    acc = _acc_dtype(x.dtype)
    width = weight.shape[1]
    xm = x.to(acc)
    if mask is not None:
        xm = xm * mask.to(acc).unsqueeze(2)
    xm = xm.transpose(1, 2)  # [B, D, T]
    if cu_seqlens is None:
        ext = _extend_rows(xm, initial_states, None, width)
    else:
        ext = _extend_varlen(xm, initial_states, cu_seqlens, width)
    masks = _tap_masks(ext.seq_e, width, ext.xe.shape[2] - (width - 1))
    w = weight.to(acc)
    pre = _outputs(ext, _conv(ext, w, None if bias is None else bias.to(acc), masks))
    return ext, masks, w, pre


def short_conv_fused_fwd(x, weight, bias, mask, initial_states, cu_seqlens,
                         activation: bool, residual: bool, return_final_states: bool):
    ext, _, _, pre = _fused_forward(x, weight, bias, mask, initial_states, cu_seqlens)
    y = torch.nn.functional.silu(pre) if activation else pre
    y = y.transpose(1, 2)
    if residual:
        y = y + x.to(y.dtype)
    out = y.to(x.dtype).contiguous()
    final = _final_states(ext, weight.shape[1]).to(x.dtype).contiguous() if return_final_states else _empty(x)
    return out, final


def short_conv_fused_bwd(x, weight, bias, mask, initial_states, cu_seqlens, dout, dfinal_states,
                         activation: bool, residual: bool):
    ext, masks, w, pre = _fused_forward(x, weight, bias, mask, initial_states, cu_seqlens)
    dout_f = dout.to(pre.dtype)
    g = dout_f.transpose(1, 2)
    if activation:
        g = g * _silu_grad(pre)
    dxm, dweight, dbias, dstates = _backward(ext, w, masks, g, dfinal_states)
    dx = dxm.transpose(1, 2)
    if mask is not None:
        dx = dx * mask.to(dx.dtype).unsqueeze(2)
    if residual:
        dx = dx + dout_f
    return (dx.to(x.dtype).contiguous(), dweight.to(weight.dtype),
            _empty(x) if bias is None else dbias.to(bias.dtype),
            _empty(x) if initial_states is None else dstates.to(initial_states.dtype).contiguous())


# ---------------------------------------------------------------------------------------------------------
# Decode step and varlen states


def short_conv_update(x, conv_state, weight, bias, cache_seqlens, conv_state_indices,
                      activation: bool, residual: bool):
    """`x` `[B, L, D]`; `conv_state` `[B|N, D, S]` updated in place. Returns `out` like `x`."""
    b, length, d = x.shape
    n = conv_state.shape[0]
    width = weight.shape[1]
    window = _window.gather_window(conv_state, cache_seqlens, conv_state_indices, width - 1, b)
    y, _ = short_conv_fused_fwd(x, weight, bias, None, window, None, activation, residual, False)
    rows = _window.valid_rows(conv_state_indices, b, n, x.device)
    y = y * rows.view(b, 1, 1).to(y.dtype)
    out = torch.empty_like(x)
    out.copy_(y)
    if b > 0 and conv_state.shape[2] > 0:
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
