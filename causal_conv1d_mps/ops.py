"""The op contracts: each operation is one `torch.library` custom op (schema, fake, autograd), defined here once.

The implementation of every op asks `_backend.select` for the backend module of the call and runs the
function of the same name (docs/BACKENDS.md). `torch.compile` traces these ops without graph breaks.

Eager calls take a shorter road to the same backend functions (an `autograd.Function`, or the backend
directly when no gradient is needed): the custom-op dispatcher costs tens of microseconds per call, which
dominates small shapes. Both roads share the autograd formulas below, so they cannot drift apart.

A backend's forward returns None for final states that were not asked for, and its backward None for the
gradients of an absent bias or absent initial states (docs/BACKENDS.md). The custom ops' schemas return
tensors, so there the op puts a new empty tensor in their place, one per call: a shared one would carry each
call's autograd graph where a Function returns it as an output (context parallel does).

`activation` is an activation code of the registry `_activation` (the api resolves the user's spelling).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _backend, _window

NS = "causal_conv1d_mps"
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
# what torch.utils._python_dispatch._get_current_dispatch_mode() tests, without its Python frame
_dispatch_stack_depth = torch._C._len_torch_dispatch_stack
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
# module globals: the eager roads below read them on every call (dynamo knows these functions by identity)
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled


def _impl(x: Tensor):
    return _backend.select(x.device, x.dtype)


def _direct(x: Tensor) -> bool:
    """True for an ordinary eager call (no tracing, no fake tensors, no functorch wrapper)."""
    return (type(x) in _PLAIN_TYPES and not _is_compiling()
            and not _dispatch_stack_depth() and not _is_functorch_wrapped(x))


def _c_apply(function: type):
    """`function.apply` without the Python wrapper of `torch.autograd.Function.apply` (about 3 us per call),
    which only matters under functorch transforms (it unwraps dead functorch wrappers); None where this
    PyTorch has no such entry point. Use it through `_apply_eager`."""
    raw = getattr(torch._C, "_FunctionBase", None)
    raw = None if raw is None else raw.__dict__.get("apply")
    return None if raw is None else raw.__get__(None, function)


def _apply_eager(function: type, c_apply, args: tuple, tensors: tuple):
    """`function.apply(*args)` for a `_direct` call: the C++ entry point when no functorch transform is active
    and none of `tensors` (the tensor arguments besides `x`, which `_direct` checked) is a functorch wrapper,
    which is all that the Python wrapper would look at."""
    if c_apply is not None and not torch._C._are_functorch_transforms_active():
        for t in tensors:
            if t is not None and _is_functorch_wrapped(t):
                break
        else:
            return c_apply(*args)
    return function.apply(*args)


def _wants_grad(a: Tensor, b: Tensor, c: Optional[Tensor] = None, d: Optional[Tensor] = None) -> bool:
    """Whether grad mode is on and one of the differentiable inputs requires grad (no generator: every call)."""
    return torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or (c is not None and c.requires_grad)
                                        or (d is not None and d.requires_grad))


def _absent(x: Tensor) -> Tensor:
    return x.new_empty(0)


def _states_or_absent(final: Optional[Tensor], x: Tensor) -> Tensor:
    """A backend's final states for the custom ops' schemas: a new empty tensor in place of None."""
    return x.new_empty(0) if final is None else final


def _grads_or_absent(grads: tuple, x: Tensor) -> tuple:
    """A backend's `(dx, dweight, dbias, dinitial_states)` for the custom ops' schemas: a new empty tensor
    in place of each None (an absent bias or absent initial states)."""
    dx, dweight, dbias, dinit = grads
    return (dx, dweight, x.new_empty(0) if dbias is None else dbias, x.new_empty(0) if dinit is None else dinit)


def _like_or_absent(t: Optional[Tensor], x: Tensor) -> Tensor:
    return torch.empty_like(t) if t is not None else _absent(x)


def _states_like(x: Tensor, rows: int, weight: Tensor, wanted: bool) -> Tensor:
    if not wanted:
        return _absent(x)
    return x.new_empty(rows, weight.shape[0], weight.shape[1] - 1)


def in_layout_of(t: Tensor, ref: Tensor) -> Tensor:
    """`t` with `ref`'s memory layout: contiguous, or channel-last for a transposed (B, T, D) `ref`."""
    if ref.is_contiguous():
        return t.contiguous()
    return t.transpose(1, 2).contiguous().transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# causal_conv1d


@torch.library.custom_op(f"{NS}::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], seq_idx: Optional[Tensor],
                      initial_states: Optional[Tensor], activation: int,
                      return_final_states: bool) -> tuple[Tensor, Tensor]:
    out, final = _impl(x).causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, activation,
                                            return_final_states)
    return out, _states_or_absent(final, x)


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, seq_idx, initial_states, activation, return_final_states):
    return torch.empty_like(x), _states_like(x, x.shape[0], weight, return_final_states)


@torch.library.custom_op(f"{NS}::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], seq_idx: Optional[Tensor],
                      initial_states: Optional[Tensor], dout: Tensor, dfinal_states: Optional[Tensor],
                      activation: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _grads_or_absent(_impl(x).causal_conv1d_bwd(x, weight, bias, seq_idx, initial_states, dout,
                                                        dfinal_states, activation), x)


@causal_conv1d_bwd.register_fake
def _(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, activation):
    return (torch.empty_like(x), torch.empty_like(weight), _like_or_absent(bias, x),
            _like_or_absent(initial_states, x))


def _final_states_grad(ctx, dfinal: Optional[Tensor]) -> Optional[Tensor]:
    """The gradient arriving on `final_states`: None when they were not asked for or nothing arrived."""
    if not ctx.return_final_states or dfinal is None or dfinal.numel() == 0:
        return None
    return dfinal.contiguous()


def _cc_setup_context(ctx, inputs, output):
    x, weight, bias, seq_idx, initial_states, activation, return_final_states = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
    ctx.activation = activation
    ctx.return_final_states = return_final_states


def _cc_gradients(ctx, dout, dfinal, bwd):
    x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
    dout = torch.zeros_like(x) if dout is None else in_layout_of(dout, x)
    if dfinal is not None:
        dfinal = _final_states_grad(ctx, dfinal)
    dx, dweight, dbias, dinit = bwd(x, weight, bias, seq_idx, initial_states, dout, dfinal, ctx.activation)
    return (dx, dweight, dbias if bias is not None else None, None,
            dinit if initial_states is not None else None, None, None)


torch.library.register_autograd(
    f"{NS}::causal_conv1d_fwd",
    lambda ctx, dout, dfinal: _cc_gradients(ctx, dout, dfinal, causal_conv1d_bwd),
    setup_context=_cc_setup_context)


@once_differentiable
def _cc_eager_backward_twice(ctx, dout, dfinal):
    return _cc_gradients(ctx, dout, dfinal, ctx.impl.causal_conv1d_bwd)


class _CausalConv1dEager(torch.autograd.Function):
    """The op's eager autograd road. Without final states it returns `out` alone: an output fewer for
    autograd to wrap (about 1 us per call), and `backward` then receives `dout` alone. `impl` is the backend
    module (None: `_backend.select` chooses it); the backward runs the same module's `causal_conv1d_bwd`."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, initial_states, activation, return_final_states, impl):
        ctx.set_materialize_grads(False)
        _cc_setup_context(ctx, (x, weight, bias, seq_idx, initial_states, activation, return_final_states), None)
        if impl is None:
            impl = _backend.select(x.device, x.dtype)
        ctx.impl = impl
        out, final = impl.causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, activation,
                                            return_final_states)
        return (out, final) if return_final_states else out

    @staticmethod
    def backward(ctx, dout, dfinal=None):
        # the engine runs this with grad mode off unless create_graph=True; only then does
        # once_differentiable's no_grad block and double-backward guard have work to do
        if torch.is_grad_enabled():
            return *_cc_eager_backward_twice(ctx, dout, dfinal), None
        return *_cc_gradients(ctx, dout, dfinal, ctx.impl.causal_conv1d_bwd), None


_CC_APPLY = _c_apply(_CausalConv1dEager)


def causal_conv1d(x, weight, bias, seq_idx, initial_states, activation: int, return_final_states: bool,
                  impl=None):
    """Runs the op on validated arguments; returns `(out, final_states)`. When they are not asked for,
    `final_states` is None on the eager roads and an empty tensor through the custom op (tracing, modes).
    `impl`: the backend module `_backend.select` would answer for x, where the caller knows it (eager roads
    only; None: selected here).

    The eager roads are written out inline (`_direct`, `_wants_grad`): this runs on every call."""
    if (type(x) not in _PLAIN_TYPES or _is_compiling() or _dispatch_stack_depth()
            or _is_functorch_wrapped(x)):  # not `_direct`: the custom op, which tracing and modes see
        return causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, activation, return_final_states)
    if _grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
                            or (initial_states is not None and initial_states.requires_grad)):
        args = (x, weight, bias, seq_idx, initial_states, activation, return_final_states, impl)
        if return_final_states:
            return _apply_eager(_CausalConv1dEager, _CC_APPLY, args, (weight, bias, seq_idx, initial_states))
        return _apply_eager(_CausalConv1dEager, _CC_APPLY, args, (weight, bias, seq_idx, initial_states)), None
    if impl is None:
        impl = _backend.select(x.device, x.dtype)
    return impl.causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, activation, return_final_states)


# ---------------------------------------------------------------------------------------------------------
# short_conv_fused


@torch.library.custom_op(f"{NS}::short_conv_fused_fwd", mutates_args=())
def short_conv_fused_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                         initial_states: Optional[Tensor], cu_seqlens: Optional[Tensor], activation: int,
                         residual: bool, return_final_states: bool) -> tuple[Tensor, Tensor]:
    out, final = _impl(x).short_conv_fused_fwd(x, weight, bias, mask, initial_states, cu_seqlens, activation,
                                               residual, return_final_states)
    return out, _states_or_absent(final, x)


def _fused_rows(x: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@short_conv_fused_fwd.register_fake
def _(x, weight, bias, mask, initial_states, cu_seqlens, activation, residual, return_final_states):
    out = x.new_empty(x.shape)
    return out, _states_like(x, _fused_rows(x, cu_seqlens), weight, return_final_states)


@torch.library.custom_op(f"{NS}::short_conv_fused_bwd", mutates_args=())
def short_conv_fused_bwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                         initial_states: Optional[Tensor], cu_seqlens: Optional[Tensor], dout: Tensor,
                         dfinal_states: Optional[Tensor], activation: int,
                         residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _grads_or_absent(_impl(x).short_conv_fused_bwd(x, weight, bias, mask, initial_states, cu_seqlens, dout,
                                                           dfinal_states, activation, residual), x)


@short_conv_fused_bwd.register_fake
def _(x, weight, bias, mask, initial_states, cu_seqlens, dout, dfinal_states, activation, residual):
    return (x.new_empty(x.shape), torch.empty_like(weight), _like_or_absent(bias, x),
            _like_or_absent(initial_states, x))


def _fused_setup_context(ctx, inputs, output):
    x, weight, bias, mask, initial_states, cu_seqlens, activation, residual, return_final_states = inputs
    ctx.save_for_backward(x, weight, bias, mask, initial_states, cu_seqlens)
    ctx.activation = activation
    ctx.residual = residual
    ctx.return_final_states = return_final_states


def _fused_gradients(ctx, dout, dfinal, bwd):
    x, weight, bias, mask, initial_states, cu_seqlens = ctx.saved_tensors
    dout = x.new_zeros(x.shape) if dout is None else dout.contiguous()
    if dfinal is not None:
        dfinal = _final_states_grad(ctx, dfinal)
    dx, dweight, dbias, dinit = bwd(x, weight, bias, mask, initial_states, cu_seqlens, dout, dfinal,
                                    ctx.activation, ctx.residual)
    return (dx, dweight, dbias if bias is not None else None, None,
            dinit if initial_states is not None else None, None, None, None, None)


torch.library.register_autograd(
    f"{NS}::short_conv_fused_fwd",
    lambda ctx, dout, dfinal: _fused_gradients(ctx, dout, dfinal, short_conv_fused_bwd),
    setup_context=_fused_setup_context)


@once_differentiable
def _fused_eager_backward_twice(ctx, dout, dfinal):
    return _fused_gradients(ctx, dout, dfinal, ctx.impl.short_conv_fused_bwd)


class _ShortConvFusedEager(torch.autograd.Function):
    """The op's eager autograd road; `out` alone without final states, `impl` the backend module or None
    (see `_CausalConv1dEager`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, initial_states, cu_seqlens, activation, residual,
                return_final_states, impl):
        ctx.set_materialize_grads(False)
        args = (x, weight, bias, mask, initial_states, cu_seqlens, activation, residual, return_final_states)
        _fused_setup_context(ctx, args, None)
        if impl is None:
            impl = _backend.select(x.device, x.dtype)
        ctx.impl = impl
        out, final = impl.short_conv_fused_fwd(*args)
        return (out, final) if return_final_states else out

    @staticmethod
    def backward(ctx, dout, dfinal=None):
        if torch.is_grad_enabled():  # create_graph=True (see _CausalConv1dEager.backward)
            return *_fused_eager_backward_twice(ctx, dout, dfinal), None
        return *_fused_gradients(ctx, dout, dfinal, ctx.impl.short_conv_fused_bwd), None


_FUSED_APPLY = _c_apply(_ShortConvFusedEager)


def short_conv_fused(x, weight, bias, mask, initial_states, cu_seqlens, activation: int, residual: bool,
                     return_final_states: bool, impl=None):
    """Runs the op on validated arguments; returns `(out, final_states)`, `final_states` None or an empty
    tensor when not asked for, `impl` the backend module or None (as for `causal_conv1d`)."""
    args = (x, weight, bias, mask, initial_states, cu_seqlens, activation, residual, return_final_states)
    if (type(x) not in _PLAIN_TYPES or _is_compiling() or _dispatch_stack_depth()
            or _is_functorch_wrapped(x)):  # not `_direct`
        return short_conv_fused_fwd(*args)
    if _grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
                            or (initial_states is not None and initial_states.requires_grad)):
        tensors = (weight, bias, mask, initial_states, cu_seqlens)
        if return_final_states:
            return _apply_eager(_ShortConvFusedEager, _FUSED_APPLY, (*args, impl), tensors)
        return _apply_eager(_ShortConvFusedEager, _FUSED_APPLY, (*args, impl), tensors), None
    if impl is None:
        impl = _backend.select(x.device, x.dtype)
    return impl.short_conv_fused_fwd(*args)


# ---------------------------------------------------------------------------------------------------------
# Decode step (mutates its state, so no autograd formula: a gradient goes through the fused op) and varlen states


@torch.library.custom_op(f"{NS}::short_conv_update", mutates_args=("conv_state",))
def short_conv_update_op(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor],
                         cache_seqlens: Optional[Tensor], conv_state_indices: Optional[Tensor],
                         activation: int, residual: bool) -> Tensor:
    return _impl(x).short_conv_update(x, conv_state, weight, bias, cache_seqlens, conv_state_indices,
                                      activation, residual)


@short_conv_update_op.register_fake
def _(x, conv_state, weight, bias, cache_seqlens, conv_state_indices, activation, residual):
    return torch.empty_like(x)


def _state_write(x, conv_state, weight, bias, cache_seqlens, conv_state_indices, activation: int,
                 residual: bool) -> Tensor:
    args = (x, conv_state, weight, bias, cache_seqlens, conv_state_indices, activation, residual)
    if _direct(x):
        return _impl(x).short_conv_update(*args)
    return short_conv_update_op(*args)


def _differentiable_step(x, conv_state, weight, bias, cache_seqlens, conv_state_indices, activation: int,
                         residual: bool) -> Tensor:
    """The step as the fused op over the window read before the update (a constant `initial_states`),
    then the state write. Padding rows enter the graph as zeros and leave it as zeros, so whatever their
    input or state slot holds (NaN included), they add nothing to dx, dweight or dbias."""
    batch, history = x.shape[0], weight.shape[1] - 1
    window = _window.gather_window(conv_state.detach(), cache_seqlens, conv_state_indices, history, batch)
    live = None
    if conv_state_indices is not None:
        live = _window.valid_rows(conv_state_indices, batch, conv_state.shape[0], x.device).view(batch, 1, 1)
    x_in = x if live is None else torch.where(live, x, 0)
    out, _ = short_conv_fused(x_in, weight, bias, None, window, None, activation, residual, False)
    if live is not None:
        out = torch.where(live, out, 0)
    with torch.no_grad():
        _state_write(x.detach(), conv_state, weight, bias, cache_seqlens, conv_state_indices, activation, residual)
    return out


def short_conv_update(x, conv_state, weight, bias, cache_seqlens, conv_state_indices, activation: int,
                      residual: bool) -> Tensor:
    """Runs the decode step on validated arguments (`x` `[B, L, D]`, `cache_seqlens` already in [0, S));
    `conv_state` is updated in place. Differentiable in x, weight and bias."""
    if _wants_grad(x, weight, bias):
        return _differentiable_step(x, conv_state, weight, bias, cache_seqlens, conv_state_indices, activation,
                                    residual)
    return _state_write(x, conv_state, weight, bias, cache_seqlens, conv_state_indices, activation, residual)


@torch.library.custom_op(f"{NS}::causal_conv1d_varlen_states", mutates_args=())
def causal_conv1d_varlen_states_op(x: Tensor, cu_seqlens: Tensor, state_len: int) -> Tensor:
    return _impl(x).causal_conv1d_varlen_states(x, cu_seqlens, state_len)


@causal_conv1d_varlen_states_op.register_fake
def _(x, cu_seqlens, state_len):
    return x.new_empty(cu_seqlens.shape[0] - 1, x.shape[1], state_len)


def causal_conv1d_varlen_states(x, cu_seqlens, state_len: int) -> Tensor:
    if _direct(x):
        return _impl(x).causal_conv1d_varlen_states(x, cu_seqlens, state_len)
    return causal_conv1d_varlen_states_op(x, cu_seqlens, state_len)
