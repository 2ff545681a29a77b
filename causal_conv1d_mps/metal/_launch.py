"""What every Metal launcher shares: kernel names, run lengths, float32 side inputs, the launch call."""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._loader import SOURCE_ENV_VAR, library

# Flags of the kernels' params (see kernels/common.metal).
HAS_BIAS, HAS_SEQ, HAS_INIT, SILU, HAS_DFINAL = 1, 2, 4, 8, 16
HAS_MASK, HAS_CU, RESIDUAL, CIRCULAR, HAS_INDICES = 32, 64, 128, 256, 512

# Threads per threadgroup of the weight-gradient kernels (CC_GROUP in common.metal).
GROUP = 256
# Widths with an unrolled instantiation; wider ones use the generic `_wany` kernels.
MAX_UNROLLED_WIDTH = 16
# thread_position_in_grid is 32-bit: keep grids below this many threads.
MAX_THREADS = 2**31

_TYPE_NAMES = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat"}


def kernel_name(stem: str, dtype: torch.dtype, width: int | str | None = None) -> str:
    """Host name of a kernel instantiation, e.g. `causal_conv1d_fwd_bfloat_w4`.

    `width`: the convolution width (widths above MAX_UNROLLED_WIDTH get the generic `_wany` kernel),
    "any" for kernels instantiated only generically, None for kernels not templated over the width.
    """
    name = f"{stem}_{_TYPE_NAMES[dtype]}"
    if width is None:
        return name
    if width == "any" or width > MAX_UNROLLED_WIDTH:
        return f"{name}_wany"
    return f"{name}_w{width}"


# Backward runs grow while the grid keeps at least this many threads: fewer weight-gradient partial rows
# (less float32 traffic) at no loss of occupancy on the largest Apple GPUs (40 cores).
BACKWARD_MIN_THREADS = 2**17


def run_length(width: int, rows: int, length: int, backward: bool = False) -> int:
    """Consecutive outputs per thread: long enough to amortise the W-1 halo, short enough for parallelism."""
    run = 8 if width <= 8 else 16
    if backward:
        while run < 64 and rows * -(-length // (2 * run)) >= BACKWARD_MIN_THREADS:
            run *= 2
    while rows * -(-length // run) >= MAX_THREADS:
        run *= 2
    return run


def as_float32(t: Tensor | None) -> Tensor | None:
    """A contiguous float32 copy of a small side input (weights, bias, states); None stays None.

    Like the other backends, states enter the convolution unrounded (not through x's dtype); final states
    are rounded once, when stored in x's dtype.
    """
    if t is None:
        return None
    return t.to(torch.float32).contiguous()


def flag(value, bit: int) -> int:
    return bit if value is not None and value is not False else 0


# (device type, source override, host name) -> (kernel, its default threadgroup size), so that a call costs
# a dict lookup rather than a library attribute lookup and a pipeline query.
_kernels: dict[tuple[str, str, str], tuple[object, int]] = {}


def launch(device: torch.device, name: str, args: list, threads: int, group_size: int | None = None) -> None:
    """Run kernel `name` over a 1-D grid of `threads` threads (a partial last threadgroup is allowed)."""
    if threads <= 0:
        return
    if threads >= 2**32:
        raise ValueError(f"{name}: a grid of {threads} threads exceeds Metal's 32-bit thread index")
    key = (device.type, os.environ.get(SOURCE_ENV_VAR, ""), name)
    found = _kernels.get(key)
    if found is None:
        kernel = getattr(library(device), name)
        found = _kernels[key] = (kernel, min(GROUP, int(kernel.max_threads_per_threadgroup)))
    kernel, default_group = found
    kernel(*args, threads=threads, group_size=group_size or default_group)


def reduce_rows(part: Tensor) -> Tensor:
    """Column sums of a float32 (rows, cols) tensor, in a fixed row order (deterministic)."""
    rows, cols = part.shape
    out = torch.empty(cols, dtype=torch.float32, device=part.device)
    launch(part.device, "reduce_rows_float", [part, out, [rows, cols]], cols)
    return out


def backward_launch(device: torch.device, stem: str, dtype: torch.dtype, inputs: list, dx: Tensor, params: list,
                    *, batch: int, dim: int, width: int, runs: int, channels: int, weight: Tensor,
                    bias: Tensor | None, initial_states: Tensor | None, state_rows: int):
    """The backward of a conv op: `{stem}_bwd` writes dx and, per threadgroup (channels x runs), one float32
    partial row of dweight/dbias in one pass; the rows are summed in a fixed order (deterministic); then
    `{stem}_bwd_dinit` gives the initial-state gradient. Returns (dweight, dbias, dinitial_states)."""
    run_groups = -(-runs // (GROUP // channels))
    part = torch.empty((batch * run_groups, dim, width + 1), dtype=torch.float32, device=device)
    groups = batch * -(-dim // channels) * run_groups
    launch(device, kernel_name(f"{stem}_bwd", dtype, width),
           [*inputs, dx, part, params + [channels, run_groups]], groups * GROUP, GROUP)
    sums = reduce_rows(part.view(batch * run_groups, dim * (width + 1))).view(dim, width + 1)
    dweight = sums[:, :width].contiguous().to(weight.dtype)
    dbias = sums[:, width].to(bias.dtype) if bias is not None else dx.new_empty(0)
    dinit = dx.new_empty(0)
    if initial_states is not None:
        dinit = torch.empty((state_rows, dim, width - 1), dtype=torch.float32, device=device)
        launch(device, kernel_name(f"{stem}_bwd_dinit", dtype, "any"), [*inputs, dinit, params], dinit.numel())
        dinit = dinit.to(initial_states.dtype)
    return dweight, dbias, dinit


def grads_without_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, initial_states: Tensor | None,
                         dfinal_states: Tensor | None, length: int):
    """(dweight, dbias, dinitial_states) when B == 0 or T == 0: no output depends on the weights, and with
    T == 0 the final states are the initial states, so their gradient passes straight through."""
    dweight = torch.zeros_like(weight)
    dbias = torch.zeros_like(bias) if bias is not None else x.new_empty(0)
    dinit = x.new_empty(0)
    if initial_states is not None:
        dinit = (dfinal_states.to(initial_states.dtype).clone() if dfinal_states is not None and length == 0
                 else torch.zeros_like(initial_states))
    return dweight, dbias, dinit


def gather_states(x: Tensor, dim: int, strides: tuple[int, int, int], length: int, n_rows: int,
                  state_len: int, initial_states: Tensor | None = None, mask: Tensor | None = None,
                  cu_seqlens: Tensor | None = None) -> Tensor:
    """(n_rows, dim, state_len) in x's dtype: the last `state_len` positions of each stream.

    A stream is a batch row of x (`strides` = its (b, t, d) strides, `length` positions) or, with
    `cu_seqlens`, one packed sequence of row 0; masked where `mask` (B, T) is given, and extended on the
    left by `initial_states` (float32, (n_rows, dim, state_len)) or zeros.
    """
    out = torch.empty((n_rows, dim, state_len), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    flags = flag(initial_states, HAS_INIT) | flag(mask, HAS_MASK) | flag(cu_seqlens, HAS_CU)
    params = [n_rows, dim, state_len, length, strides[0], strides[1], strides[2], flags]
    f32, i32, dev = torch.float32, torch.int32, x.device
    # an empty x (T == 0: the states come from initial_states alone) has no buffer to bind; it is never read
    x_arg = x if x.numel() > 0 else optional(None, x.dtype, dev)
    args = [x_arg, optional(initial_states, f32, dev), optional(mask, f32, dev), optional(cu_seqlens, i32, dev),
            out, params]
    launch(x.device, kernel_name("gather_states", x.dtype), args, out.numel())
    return out


_stand_ins: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def optional(t: Tensor | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`t`, or for an absent optional input a one-element stand-in of the kernel parameter's element type.

    The kernel never reads a stand-in (the input's flag is off); it exists because every [[buffer(i)]] must be
    bound. One per (device, dtype), allocated once.
    """
    if t is not None:
        return t
    key = (device, dtype)
    stand_in = _stand_ins.get(key)
    if stand_in is None:
        stand_in = _stand_ins[key] = torch.zeros(1, dtype=dtype, device=device)
    return stand_in
