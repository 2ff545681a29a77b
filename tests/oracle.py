"""An independent float64 definition of every op of docs/CONTRACT.md section 3, for the tests.

Written from docs/CONTRACT.md sections 2-3 alone; it deliberately does not import
`causal_conv1d_mps.reference`, so that a mistake in the package's reference path cannot hide
in the oracle too. Clarity beats speed: the convolution is a loop over the width `W`, the
decode step a loop over tokens. Everything is computed in float64 with differentiable torch
ops, so test gradients come from autograd through these functions.

Conventions: `(B, D, T)` ("channel-first") for `causal_conv1d`, `(B, T, D)` for the fused
short convolution and its decode step, states are `(B|N, D, W-1)` or `(B|N, D, S)`.

Masking is by selection (`torch.where` on the inputs of a product), never by multiplying with 0: what is
outside a sequence (another packed sequence, a padding position or row, a position whose attention mask
is 0) must not reach it even when it is NaN or Inf, and autograd through `where` then gives it exactly
zero gradient, with nothing NaN multiplied into dweight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

F64 = torch.float64


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    """Float64 on the CPU (the oracle runs there whatever the tested device; MPS has no float64)."""
    return None if t is None else t.cpu().to(F64)


def _act(pre: torch.Tensor, silu: bool) -> torch.Tensor:
    return pre * torch.sigmoid(pre) if silu else pre


def is_silu(activation) -> bool:
    """The string/bool activation forms of docs/CONTRACT.md sections 3.1, 3.4 and 3.8."""
    if activation is None or activation is False:
        return False
    if activation is True or activation in ("silu", "swish"):
        return True
    raise ValueError(f"oracle: unknown activation {activation!r}")


def extend_left(x: torch.Tensor, width: int, initial_states: torch.Tensor | None) -> torch.Tensor:
    """`xe`: `x` `[..., D, T]` with the `width-1` previous inputs prepended (zeros when not given)."""
    history = width - 1
    if initial_states is None:
        initial_states = x.new_zeros(*x.shape[:-1], history)
    return torch.cat([initial_states.to(x.dtype), x], dim=-1)


def conv_taps(xe: torch.Tensor, weight: torch.Tensor, tap_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`sum_k weight[d, k] * xe[..., d, t + k]` for `t` in `[0, T)`, with `T = xe.shape[-1] - W + 1`.

    `tap_mask[k]`, when given, is a `[B, T]` bool tensor saying which taps `k` may contribute. Both the
    source and the product are selected: the source so that its value (NaN included) never matters, the
    product so that a NaN gradient arriving at the output never reaches dweight through a tap that does
    not exist (autograd would multiply it by the selected 0).
    """
    width = weight.shape[1]
    steps = xe.shape[-1] - width + 1
    acc = xe.new_zeros(*xe.shape[:-1], steps)
    for k in range(width):
        source = xe[..., k : k + steps]
        if tap_mask is None:
            acc = acc + weight[:, k, None] * source
        else:
            counts = tap_mask[k][:, None, :]
            acc = acc + torch.where(counts, weight[:, k, None] * torch.where(counts, source, 0.0), 0.0)
    return acc


def _seq_idx_tap_masks(seq_idx: torch.Tensor, width: int) -> list[torch.Tensor]:
    """Per tap `k`, where the input at time `t - (W-1) + k` belongs to the sequence of output `t` and
    `t` is not padding (a padding output is the constant 0: none of its taps may count).

    Positions before 0 are initial states; they belong to the sequence at position 0 of the row
    (docs/CONTRACT.md section 2.8), so they count where `seq_idx[b, t] == seq_idx[b, 0]`.
    """
    batch, steps = seq_idx.shape
    masks = []
    for k in range(width):
        shift = width - 1 - k  # how far back this tap looks
        if shift == 0:
            source = seq_idx
        else:
            before = seq_idx[:, :1].expand(batch, min(shift, steps))
            source = torch.cat([before, seq_idx[:, : max(steps - shift, 0)]], dim=1)[:, :steps]
        masks.append((source == seq_idx) & (seq_idx >= 0))
    return masks


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation=None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/CONTRACT.md section 3.1 in float64: `x` `[B, D, T]` -> `(out [B, D, T], final_states [B, D, W-1])`."""
    x, weight, bias, initial_states = _f64(x), _f64(weight), _f64(bias), _f64(initial_states)
    seq_idx = None if seq_idx is None else seq_idx.cpu()
    width = weight.shape[1]
    xe = extend_left(x, width, initial_states)
    tap_mask = None if seq_idx is None else _seq_idx_tap_masks(seq_idx, width)
    pre = conv_taps(xe, weight, tap_mask)
    if bias is not None:
        pre = pre + bias[:, None]
    out = _act(pre, is_silu(activation))
    if seq_idx is not None:
        out = torch.where((seq_idx >= 0)[:, None, :], out, 0.0)  # padding positions output 0
    final_states = xe[..., xe.shape[-1] - (width - 1) :]
    return out, final_states


def normalise_mask(mask: torch.Tensor, batch: int, steps: int) -> torch.Tensor:
    """The accepted attention-mask forms of docs/CONTRACT.md section 2.6, as a `[B, T]` float64 multiplier.

    Decisions where the contract leaves a choice (the order of the checks is the precedence):
    - 2-D: `(B, T)` first (so a square mask with B == T is `(B, T)`), then `(1, T)`, `(B, 1)`,
      `(T, B)`, then `(B or 1, more than T)` keeping the last `T` columns.
    - 1-D: length `T` first (one mask shared by every row), then `B` (one value per row),
      then `B*T` (row-major `(B, T)`). With B == T > 1 a 1-D mask is therefore read over time.
    """
    m = mask.cpu().to(F64)
    if m.dim() == 1:
        n = m.shape[0]
        if n == steps:
            return m[None, :].expand(batch, steps)
        if n == batch:
            return m[:, None].expand(batch, steps)
        if n == batch * steps:
            return m.reshape(batch, steps)
    elif m.dim() == 2:
        rows, cols = m.shape
        if (rows, cols) == (batch, steps):
            return m
        if (rows, cols) == (1, steps):
            return m.expand(batch, steps)
        if (rows, cols) == (batch, 1):
            return m.expand(batch, steps)
        if (rows, cols) == (steps, batch):
            return m.t()
        if rows in (batch, 1) and cols > steps:
            return m[:, cols - steps :].expand(batch, steps)
    raise ValueError(f"oracle: mask of shape {tuple(mask.shape)} cannot be normalised to ({batch}, {steps})")


def _conv_one_stream(xt, weight, bias, initial_states, silu):
    """Causal conv of `xt` `[B, D, T]` (already masked); returns `(act(pre), final_states)`."""
    width = weight.shape[1]
    xe = extend_left(xt, width, initial_states)
    pre = conv_taps(xe, weight)
    if bias is not None:
        pre = pre + bias[:, None]
    return _act(pre, silu), xe[..., xe.shape[-1] - (width - 1) :]


def short_conv_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    activation: bool = True,
    residual: bool = True,
    initial_states: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/CONTRACT.md section 3.4 in float64: `x` `[B, T, D]` -> `(out [B, T, D], final_states [B|N, D, W-1])`."""
    x, weight, bias, initial_states = _f64(x), _f64(weight), _f64(bias), _f64(initial_states)
    batch, steps, _ = x.shape
    xt = x.transpose(1, 2)
    if attention_mask is not None:
        m = normalise_mask(attention_mask, batch, steps)[:, None, :]
        xt = torch.where(m != 0, xt * m, 0.0)  # a masked-out position contributes nothing, NaN included
    silu = is_silu(activation)
    if cu_seqlens is None:
        conv, final_states = _conv_one_stream(xt, weight, bias, initial_states, silu)
    else:
        bounds = [int(v) for v in cu_seqlens]
        pieces, finals = [], []
        for n in range(len(bounds) - 1):
            start, end = bounds[n], bounds[n + 1]
            init = None if initial_states is None else initial_states[n : n + 1]
            piece, final = _conv_one_stream(xt[:, :, start:end], weight, bias, init, silu)
            pieces.append(piece)
            finals.append(final)
        conv = torch.cat(pieces, dim=-1) if pieces else xt[..., :0]
        final_states = torch.cat(finals, dim=0) if finals else x.new_zeros(0, x.shape[2], weight.shape[1] - 1)
    out = conv.transpose(1, 2)
    if residual:
        out = out + x
    return out, final_states


def _update_rows(x, conv_state, weight, bias, cache_seqlens, conv_state_indices, silu, residual):
    """Decode `x` `[B, L, D]` token by token. Returns float64 `out` and the new state (state dtype).

    Each row keeps two views of its state: `state` (the bits, in the state's dtype) and `columns`, the
    same entries as float64 tensors where a column written by this call is the token itself, so that
    a later token's output is differentiable in the earlier tokens (only the state read before the
    call is a constant, docs/CONTRACT.md section 3.6).
    """
    state = conv_state.clone()
    batch, length, _ = x.shape
    width = weight.shape[1]
    size = state.shape[-1]
    history = width - 1
    rows = []
    for b in range(batch):
        slot = b if conv_state_indices is None else int(conv_state_indices[b])
        if slot < 0:  # padding slot: output 0, no state touched
            rows.append(x.new_zeros(length, x.shape[2], dtype=F64))
            continue
        columns = [state[slot][:, j].to(F64, copy=True) for j in range(size)]
        outs = []
        for i in range(length):
            token = x[b, i].to(F64)  # [D]
            if cache_seqlens is None:
                taps = columns[size - history :]
            else:
                pos = (int(cache_seqlens[b]) + i) % size
                taps = [columns[(pos - history + j) % size] for j in range(history)]
            xe = torch.stack(taps + [token], dim=1)  # [D, W]
            pre = (weight * xe).sum(dim=1)
            if bias is not None:
                pre = pre + bias
            y = _act(pre, silu)
            if residual:
                y = y + token
            outs.append(y)
            # The write happens after the read: with S == W-1 the oldest tap is the column written.
            if size == 0:  # W == 1 with an empty state: nothing to remember
                continue
            new = x[b, i].detach().to(state.dtype)
            if cache_seqlens is None:
                columns = columns[1:] + [token]
                state[slot] = torch.cat([state[slot][:, 1:], new[:, None]], dim=1)
            else:
                columns[pos] = token
                state[slot][:, pos] = new
        rows.append(torch.stack(outs, dim=0))
    return torch.stack(rows, dim=0) if rows else x.new_zeros(0, length, x.shape[2], dtype=F64), state


def short_conv_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | None = None,
    activation: bool = True,
    residual: bool = True,
    conv_state_indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/CONTRACT.md section 3.6: `x` `[B, D]` or `[B, L, D]` -> `(out float64 like x, new conv_state)`.

    The state argument is not modified; the returned state is a copy in its own dtype, which a
    backend must match exactly (its entries are copies of inputs).
    """
    single = x.dim() == 2
    x3 = (x[:, None, :] if single else x).cpu()
    out, state = _update_rows(
        x3, conv_state.cpu(), _f64(weight), _f64(bias), cache_seqlens, conv_state_indices, is_silu(activation), residual
    )
    return (out[:, 0] if single else out), state


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None, conv_state_indices=None):
    """docs/CONTRACT.md section 3.8, the Dao layout: `x` `[B, D]` or `[B, D, L]`."""
    x_btd = x if x.dim() == 2 else x.transpose(1, 2)
    out, state = short_conv_update(
        x_btd, conv_state, weight, bias, cache_seqlens, is_silu(activation), False, conv_state_indices
    )
    return (out if x.dim() == 2 else out.transpose(1, 2)), state


def causal_conv1d_varlen_states(x: torch.Tensor, cu_seqlens: torch.Tensor, state_len: int) -> torch.Tensor:
    """docs/CONTRACT.md section 3.9: `x` `[total_T, D]` -> `[N, D, state_len]`, zero-filled on the left, in
    `x.dtype`."""
    bounds = [int(v) for v in cu_seqlens]
    states = x.new_zeros(len(bounds) - 1, x.shape[1], state_len)
    for n in range(len(bounds) - 1):
        start, end = bounds[n], bounds[n + 1]
        take = min(state_len, end - start)
        if take > 0:
            states[n, :, state_len - take :] = x[end - take : end].t()
    return states


def conv1d_reference_check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A second, structurally different definition of the plain causal conv (F.conv1d with left
    padding), used once by the tests to check the oracle itself."""
    width = weight.shape[1]
    return F.conv1d(F.pad(_f64(x), (width - 1, 0)), _f64(weight)[:, None, :], _f64(bias), groups=weight.shape[0])
