"""The public functions (docs/CONTRACT.md section 3): validate, normalise, then run the op of `ops.py`.

Shapes are written `[B, D, T]` (channel-first family) and `[B, T, D]` (fused family). Accumulation is
float32 (float64 for float64 inputs); outputs take `x`'s dtype; weights are used in their own dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _activation, _backend
from . import _validate as check
from . import ops


def _int32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.int32).contiguous()


def _contig(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _is_channel_last(x: Tensor) -> bool:
    """`x.transpose(1, 2).is_contiguous()` for a 3-D `x` `[B, D, T]`, read from its strides (a transposed
    view costs more than the rest of the check); dimensions of size 1 may have any stride, as in PyTorch."""
    b, d, t = x.shape
    sb, sd, st = x.stride()
    return (d < 2 or sd == 1) and (t < 2 or st == d) and (b < 2 or sb == t * d)


def _bdt_layout(x: Tensor) -> Tensor:
    """`x` itself when contiguous or channel-last (a transposed contiguous `[B, T, D]`), else a contiguous copy."""
    if x.is_contiguous() or _is_channel_last(x):
        return x
    return x.contiguous()


_set_grad_enabled = torch._C._set_grad_enabled


def _without_grad(fn, args: tuple, kwargs: dict):
    """`fn(*args, **kwargs)` with grad mode off, as under `torch.no_grad()`, whose object and two Python frames
    cost about 2 us per call: an eager call sets the grad-mode flag and puts it back however `fn` ends.
    Under torch.compile it is the context manager, which dynamo knows."""
    if torch.compiler.is_compiling():
        with torch.no_grad():
            return fn(*args, **kwargs)
    enabled = torch.is_grad_enabled()
    _set_grad_enabled(False)
    try:
        return fn(*args, **kwargs)
    finally:
        _set_grad_enabled(enabled)


# The verdicts of the metadata-only checks of `causal_conv1d` and `short_conv_fused`, per call signature
# (`_validate.Verdicts`; the decode step's are below): a repeated call skips them. Without a signature
# (torch.compile among others) the tables are not touched: dynamo would guard on their length.
# A verdict is the `_backend.Choice` for x's device and dtype (both in the signature): while the environment
# variable holds the value it was chosen under, the call hands its module to `ops` and skips `select`.
_conv_verdicts = check.Verdicts()
_backend.on_clear(_conv_verdicts.clear)
_forced_value = _backend.forced_value
_Choice = _backend.Choice


def _check_causal_conv1d(x, weight, bias, seq_idx, initial_states, final_states_out) -> None:
    """The checks of `causal_conv1d`'s arguments that read metadata only."""
    width = check.causal_conv1d_inputs(x, weight, bias, seq_idx, initial_states)
    if final_states_out is not None:
        b, d, _ = x.shape
        check.states("final_states_out", final_states_out, b, d, width, "B")
    if not check.on_one_device(x, weight, bias, seq_idx, initial_states, final_states_out):
        check.same_device(x=x, weight=weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states,
                          final_states_out=final_states_out)
    if final_states_out is not None:
        check.not_self_overlapping("final_states_out", final_states_out)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None, *,
                  seq_idx: Tensor | None = None, initial_states: Tensor | None = None,
                  return_final_states: bool = False, final_states_out: Tensor | None = None):
    """Causal depthwise conv of `x` `[B, D, T]` with `weight` `[D, W]`, optional `bias` `[D]` and
    `activation` (None, 'silu' or 'swish').

    `x` may be contiguous or the channel-last view `x_btd.transpose(1, 2)`; `out` has the same layout and
    no copy is made (other strides are copied to contiguous first). `seq_idx` `[B, T]` int: taps only
    within one sequence id, output 0 where it is negative. `initial_states` `[B, D, W-1]` are the inputs
    before t = 0. With `return_final_states` (implied by `final_states_out`), returns `(out, final_states)`,
    the last W-1 columns of the extended input; `final_states_out` is written in place and returned.
    Differentiable in x, weight, bias and initial_states (a gradient on final_states is honoured).
    """
    act = _activation.code(activation)
    signature = check.call_signature("causal_conv1d", x, weight, bias, seq_idx, initial_states, final_states_out)
    choice = None if signature is None else _conv_verdicts.get(signature)
    if choice is None:
        _check_causal_conv1d(x, weight, bias, seq_idx, initial_states, final_states_out)
        if signature is not None:
            choice = _conv_verdicts.remember(signature, _Choice(x.device, x.dtype))
    if final_states_out is not None:
        check.not_sharing_memory("final_states_out", final_states_out, x=x, weight=weight, bias=bias,
                                 seq_idx=seq_idx, initial_states=initial_states)
    want_final = return_final_states or final_states_out is not None
    if seq_idx is not None:
        seq_idx = check.seq_idx_int32(seq_idx)
    # the helpers `_bdt_layout` and `_contig` written out: a frame each, on every call
    out, final = ops.causal_conv1d(x if x.is_contiguous() else _bdt_layout(x), weight.contiguous(),
                                   None if bias is None else bias.contiguous(), seq_idx,
                                   None if initial_states is None else initial_states.contiguous(), act, want_final,
                                   None if choice is None or choice[0] != _forced_value() else choice[1])
    if not want_final:
        return out
    if final_states_out is not None:
        final = final_states_out.copy_(final)
    return out, final


def causal_conv1d_fn(x: Tensor, weight: Tensor, bias: Tensor | None = None, seq_idx: Tensor | None = None,
                     initial_states: Tensor | None = None, return_final_states: bool = False,
                     final_states_out: Tensor | None = None, activation: str | None = None, *,
                     cu_seqlens: Tensor | None = None):
    """Dao-AILab `causal_conv1d_fn`'s positional order; the same op as `causal_conv1d`.

    `cu_seqlens` `[N+1]` (keyword only, `x` `[1, D, total_T]`) packs N sequences convolved independently,
    like `seq_idx` does; `initial_states` / final states are then per sequence, `[N, D, W-1]`, and `out`
    is the channel-last view of a contiguous `[1, total_T, D]`.
    """
    if cu_seqlens is None:
        return causal_conv1d(x, weight, bias, activation, seq_idx=seq_idx, initial_states=initial_states,
                             return_final_states=return_final_states, final_states_out=final_states_out)
    act = _activation.code(activation)
    if seq_idx is not None:
        raise ValueError("seq_idx: expected None when cu_seqlens is given (both describe the packing), got a tensor")
    check.tensor("x", x, ndim=3)
    if x.shape[0] != 1:
        raise ValueError(f"x: expected shape (1, D, total_T) with cu_seqlens (packed sequences), got {tuple(x.shape)}")
    want_final = return_final_states or final_states_out is not None
    result = _short_conv_fused(x.transpose(1, 2), weight, bias, None, act, False, initial_states, want_final,
                               cu_seqlens)
    if not want_final:
        return result.transpose(1, 2)
    out, final = result
    if final_states_out is not None:
        check.states("final_states_out", final_states_out, final.shape[0], final.shape[1], weight.shape[-1], "N")
        final = final_states_out.copy_(final)
    return out.transpose(1, 2), final


def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Tensor | None = None, silu_activation: bool = False) -> Tensor:
    """Forward only (records no autograd graph): `[B, D, T]` result."""
    return _without_grad(causal_conv1d, (x, weight, bias, "silu" if silu_activation else None), {})


def short_conv_fused(x: Tensor, weight: Tensor, bias: Tensor | None = None, attention_mask: Tensor | None = None,
                     activation: bool = True, residual: bool = True, *, initial_states: Tensor | None = None,
                     return_final_states: bool = False, cu_seqlens: Tensor | None = None):
    """`out = (x if residual else 0) + act(bias + conv(x * mask))` over `x` `[B, T, D]`, in one pass.

    `x` needs `x.stride(2) == 1` and is read in place whatever its B/T strides (otherwise it is copied);
    `out` is a new contiguous `[B, T, D]`. `attention_mask` in any form of docs/CONTRACT.md section 2.6 multiplies
    the conv input (the residual adds the unmasked x); it gets no gradient. `activation` True (or 'silu'/'swish') applies
    SiLU. `cu_seqlens` `[N+1]` (with B == 1) packs N sequences convolved independently; states are then
    `[N, D, W-1]`, else `[B, D, W-1]`. States are inputs of the conv: `initial_states` are not masked again,
    final states are the last W-1 columns of the masked, extended input. Returns `out`, or
    `(out, final_states)` with `return_final_states`.
    """
    return _short_conv_fused(x, weight, bias, attention_mask, _activation.code(activation, allow_bool=True),
                             residual, initial_states, return_final_states, cu_seqlens)


def _short_conv_fused(x, weight, bias, attention_mask, activation: int, residual, initial_states,
                      return_final_states, cu_seqlens, states_name: str = "initial_states"):
    """`short_conv_fused` with `activation` already a code of `_activation`; errors about the initial states
    name them `states_name` (the module's `cache`)."""
    signature = check.call_signature("short_conv_fused", x, weight, bias, attention_mask, initial_states, cu_seqlens)
    choice = None if signature is None else _conv_verdicts.get(signature)
    if choice is not None:  # what remains to check reads values
        mask = None
        if attention_mask is not None or cu_seqlens is not None:
            b, t, _ = x.shape
            if attention_mask is not None:
                mask = check.normalize_mask(attention_mask, b, t, check.mask_dtype(x, attention_mask, True))
            if cu_seqlens is not None:
                check.cu_seqlens(cu_seqlens, t)
    else:
        _, mask, _ = check.short_conv_fused_inputs(x, weight, bias, attention_mask, initial_states, cu_seqlens,
                                                   offsets_end_at_t=True, states_name=states_name,
                                                   native_mask=True)
        if not check.on_one_device(x, weight, bias, attention_mask, initial_states, cu_seqlens):
            check.same_device(x=x, weight=weight, bias=bias, attention_mask=attention_mask,
                              **{states_name: initial_states}, cu_seqlens=cu_seqlens)
        if signature is not None:
            choice = _conv_verdicts.remember(signature, _Choice(x.device, x.dtype))
    if x.stride(2) != 1 and x.shape[2] > 1:
        x = x.contiguous()
    # `_contig` and `_int32` written out for absent arguments: a frame each, on every call
    out, final = ops.short_conv_fused(x, weight.contiguous(), None if bias is None else bias.contiguous(), mask,
                                      None if initial_states is None else initial_states.contiguous(),
                                      None if cu_seqlens is None else _int32(cu_seqlens), activation,
                                      bool(residual), return_final_states,
                                      None if choice is None or choice[0] != _forced_value() else choice[1])
    return (out, final) if return_final_states else out


def short_conv_fused_fwd_only(*args, **kwargs):
    """`short_conv_fused` without recording an autograd graph."""
    return _without_grad(short_conv_fused, args, kwargs)


# Decode steps check one signature per layer and token: the verdict of the metadata-only checks is kept per
# signature (`_validate.Verdicts`), so that a repeated call costs one key and one lookup above the checks
# that read pointers or values. The layouts of `x` tell the public functions apart.
_BLD, _BDL = 0, 1
_decode_verdicts = check.Verdicts()
# the function forms skip the method's argument parsing (about 0.2 us each, and a decode step makes two views)
_unsqueeze, _squeeze = torch.unsqueeze, torch.squeeze


def _check_decode_step(x3: Tensor, conv_state, weight, bias, cache_seqlens, conv_state_indices,
                       state_name: str) -> tuple:
    """The checks of a decode step on `x3` `[B, L, D]` that read metadata only (and the grad mode, for a state
    that requires grad); returns the verdict kept for its signature: `(N, S, conv_state's byte extent (0:
    nothing to compare), the byte extents of (x3, weight, bias, cache_seqlens, conv_state_indices))`."""
    b, _, d = x3.shape
    check.tensor(state_name, conv_state, ndim=3)
    n, state_d, state_len = conv_state.shape
    if isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[0] == state_d != d:
        raise ValueError(f"x: expected {weight.shape[0]} channels (those of weight and {state_name}), got {d}")
    width = check.weight_and_bias(weight, bias, d)
    check.floating(state_name, conv_state)
    if conv_state.dtype != x3.dtype:
        raise TypeError(f"{state_name}: expected dtype {x3.dtype} (the dtype of x), got {conv_state.dtype}")
    if state_d != d or state_len < width - 1:
        raise ValueError(f"{state_name}: expected shape (B or N, {d}, S) with S >= W-1 = {width - 1}, "
                         f"got {tuple(conv_state.shape)}")
    if conv_state_indices is None and n != b:
        raise ValueError(f"{state_name}: expected {b} rows (one per batch row, no conv_state_indices), "
                         f"got shape {tuple(conv_state.shape)}")
    if cache_seqlens is not None:
        check.index_vector("cache_seqlens", cache_seqlens, b)
    if conv_state_indices is not None:
        check.index_vector("conv_state_indices", conv_state_indices, b)
    if not check.on_one_device(x3, conv_state, weight, bias, cache_seqlens, conv_state_indices):
        check.same_device(x=x3, **{state_name: conv_state}, weight=weight, bias=bias, cache_seqlens=cache_seqlens,
                          conv_state_indices=conv_state_indices)
    check.not_leaf_requiring_grad(state_name, conv_state)
    check.not_self_overlapping(state_name, conv_state)
    extents = tuple(0 if t is None else check.byte_extent(t)
                    for t in (x3, weight, bias, cache_seqlens, conv_state_indices))
    return (n, state_len, 0 if conv_state.is_meta else check.byte_extent(conv_state), extents)


_MULTI_TOKEN_SHAPE = {_BLD: "(B, L, D)", _BDL: "(B, D, L)"}


def _decode(layout: int, x, conv_state, weight, bias, cache_seqlens, conv_state_indices, activation: int,
            residual: bool, state_name: str = "conv_state") -> Tensor:
    """Validated decode step on `x` `[B, D]` (one token) or `[B, L, D]` (`_BLD`) / `[B, D, L]` (`_BDL`);
    returns `out` like `x`. Errors about the state name it `state_name` (the module passes its `cache`).
    The metadata checks run only for a signature without a kept verdict."""
    signature = check.decode_signature(layout, x, conv_state, weight, bias, cache_seqlens, conv_state_indices)
    verdict = None if signature is None else _decode_verdicts.get(signature)
    if verdict is None:
        check.tensor("x", x)
        check.floating("x", x)
    one_token = x.dim() == 2
    if not one_token and x.dim() != 3:
        raise ValueError(f"x: expected shape (B, D) or {_MULTI_TOKEN_SHAPE[layout]}, got {tuple(x.shape)}")
    # mT: transpose(1, 2) of a 3-D x, without the method's argument parsing
    x3 = _unsqueeze(x, 1) if one_token else x if layout == _BLD else x.mT
    if verdict is None:
        verdict = _check_decode_step(x3, conv_state, weight, bias, cache_seqlens, conv_state_indices, state_name)
        if signature is not None:
            _decode_verdicts.remember(signature, verdict)
        conflict = True
    else:  # pointers change from call to call: only those near the state's bytes need the full check
        conflict = check.may_conflict(conv_state, verdict[2], (x3, weight, bias, cache_seqlens, conv_state_indices),
                                      verdict[3])
    if conflict:
        check.memory_conflict(state_name, conv_state, "x", x3, "weight", weight, "bias", bias, "cache_seqlens",
                              cache_seqlens, "conv_state_indices", conv_state_indices)
    n, state_len = verdict[0], verdict[1]
    if conv_state_indices is not None:
        check.state_indices_in_range(conv_state_indices, n)
    seqlens = None if cache_seqlens is None else check.circular_positions(cache_seqlens, state_len)
    indices = None if conv_state_indices is None else check.state_indices_int32(conv_state_indices, n)
    # the state is written, never differentiated: a non-leaf that requires grad is updated as plain memory
    state = conv_state.detach() if conv_state.requires_grad else conv_state
    out = ops.short_conv_update(x3, state, weight.contiguous(), None if bias is None else bias.contiguous(),
                                seqlens, indices, activation, residual)
    return _squeeze(out, 1) if one_token else out if layout == _BLD else out.mT


def short_conv_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                      cache_seqlens: Tensor | None = None, activation: bool = True, residual: bool = True, *,
                      conv_state_indices: Tensor | None = None) -> Tensor:
    """Decode step of the `[B, T, D]` family; `x` `[B, D]` (one token) or `[B, L, D]`; returns the same shape.

    `conv_state` `[B, D, S]` (`[N, D, S]` with `conv_state_indices`), `S >= W-1`, dtype of x, is updated in
    place whatever its strides. Shift mode (`cache_seqlens=None`): the state holds the last S inputs, newest
    last. Circular mode: input i of row b goes to column `(cache_seqlens[b] + i) % S` (the caller advances
    cache_seqlens). `conv_state_indices[b] < 0` marks a padding row: output 0, no state touched (indices
    >= N raise on CPU and are treated as padding on GPUs). Differentiable in x, weight and bias.
    """
    return _decode(_BLD, x, conv_state, weight, bias, cache_seqlens, conv_state_indices,
                   _activation.code(activation, allow_bool=True), bool(residual))


def _short_conv_update(x, conv_state, weight, bias, cache_seqlens, activation: int, residual, conv_state_indices,
                       state_name: str = "conv_state") -> Tensor:
    """`short_conv_update` with `activation` already a code of `_activation`; errors about the state name it
    `state_name` (the module's `cache`)."""
    return _decode(_BLD, x, conv_state, weight, bias, cache_seqlens, conv_state_indices, activation, bool(residual),
                   state_name)


def short_conv_update_fwd_only(*args, **kwargs) -> Tensor:
    """`short_conv_update` without recording an autograd graph."""
    return _without_grad(short_conv_update, args, kwargs)


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                         activation: str | None = None, cache_seqlens: Tensor | None = None,
                         conv_state_indices: Tensor | None = None) -> Tensor:
    """Dao-compatible decode step: `x` `[B, D]` or `[B, D, L]`, `conv_state` `[B|N, D, S]` updated in place."""
    return _decode(_BDL, x, conv_state, weight, bias, cache_seqlens, conv_state_indices, _activation.code(activation),
                   False)


def causal_conv1d_varlen_states(x: Tensor, cu_seqlens: Tensor, state_len: int) -> Tensor:
    """`x` `[total_T, D]` packed by `cu_seqlens` `[N+1]`: returns `[N, D, state_len]`, each sequence's last
    `state_len` inputs, zero-filled on the left where the sequence is shorter (decode caches after prefill)."""
    check.tensor("x", x, ndim=2)
    check.floating("x", x)
    if isinstance(state_len, bool) or not isinstance(state_len, int) or state_len < 0:
        raise ValueError(f"state_len: expected an int >= 0, got {state_len!r}")
    check.cu_seqlens(cu_seqlens, x.shape[0])
    check.same_device(x=x, cu_seqlens=cu_seqlens)
    if x.stride(1) != 1 and x.shape[1] > 1:
        x = x.contiguous()
    return ops.causal_conv1d_varlen_states(x, _int32(cu_seqlens), state_len)
