"""What every Metal launcher shares: kernel names, run lengths, float32 side inputs, the launch call."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _contract
from ._loader import MetalCompileError, compile_family, first_error_line, kernel_name

FLAGS = _contract.FLAGS
HAS_BIAS, HAS_SEQ, HAS_INIT, HAS_DFINAL = (FLAGS[n] for n in ("HAS_BIAS", "HAS_SEQ", "HAS_INIT", "HAS_DFINAL"))
HAS_MASK, HAS_CU, RESIDUAL, CIRCULAR, HAS_INDICES = (FLAGS[n] for n in ("HAS_MASK", "HAS_CU", "RESIDUAL",
                                                                        "CIRCULAR", "HAS_INDICES"))
# Threads per threadgroup of the weight-gradient kernels (CC_GROUP in the generated header).
GROUP = _contract.GROUP
# thread_position_in_grid is 32-bit: keep grids below this many threads.
MAX_THREADS = 2**31


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


# (library, host name) -> (kernel, its max_threads_per_threadgroup), so that a call costs a dict lookup
# rather than a library attribute lookup and a pipeline query.
_kernels: dict[tuple[object, str], tuple[object, int]] = {}


def launch(device: torch.device, family: str, name: str, args: list, threads: int,
           group_size: int | None = None) -> None:
    """Run kernel `name` of `family` over a 1-D grid of `threads` threads (a partial last threadgroup is
    allowed). `group_size`: the threadgroup size the kernel's threadgroup reduction needs; None for kernels
    that need none: then min(GROUP, the pipeline's limit, threads), never more threads than the grid.
    Raises MetalCompileError, before anything runs, when the kernel or its pipeline cannot be created or the
    pipeline cannot run `group_size` threads per threadgroup."""
    if threads <= 0:
        return
    if threads >= 2**32:
        raise ValueError(f"{name}: a grid of {threads} threads exceeds Metal's 32-bit thread index")
    lib = compile_family(device, family)
    key = (lib, name)  # holds the library: no id reuse
    found = _kernels.get(key)
    if found is None:
        try:  # some releases compile, or build the pipeline, only now: a failure is still a fallback
            kernel = getattr(lib, name)
            found = (kernel, int(kernel.max_threads_per_threadgroup))
        except (SyntaxError, RuntimeError, AttributeError) as exc:
            raise MetalCompileError(family, first_error_line(str(exc)), str(exc)) from exc
        _kernels[key] = found
    kernel, max_threads = found
    if group_size is None:
        group_size = min(GROUP, max_threads, threads)
    elif group_size > max_threads:
        raise MetalCompileError(family, f"kernel {name!r} allows {max_threads} threads per threadgroup; its "
                                        f"threadgroup reduction needs {group_size}")
    kernel(*args, threads=threads, group_size=group_size)


def reduce_rows(part: Tensor) -> Tensor:
    """Column sums of a float32 (rows, cols) tensor, in a fixed row order (deterministic)."""
    rows, cols = part.shape
    out = torch.empty(cols, dtype=torch.float32, device=part.device)
    launch(part.device, "states", "reduce_rows_float", [part, out, _contract.pack("REDUCE", ROWS=rows, COLS=cols)],
           cols)
    return out


def backward_launch(device: torch.device, family: str, table: str, dtype: torch.dtype, inputs: list, dx: Tensor,
                    values: dict, *, batch: int, dim: int, width: int, channels: int, weight: Tensor,
                    bias: Tensor | None, initial_states: Tensor | None, state_rows: int):
    """The backward of a conv op (`family` = its kernel stem; `values`: its parameter slots by name, the
    threadgroup tile's CHANNELS and RUN_GROUPS aside): `{family}_bwd` writes dx and, per threadgroup of GROUP
    threads (channels x runs), one float32 partial row of dweight/dbias in one pass; the rows are summed in a
    fixed order (deterministic); then `{family}_bwd_dinit` gives the initial-state gradient.
    Returns (dweight, dbias, dinitial_states), None for an absent bias or absent initial states."""
    run_groups = -(-values["RUNS"] // (GROUP // channels))
    params = _contract.pack(table, **{**values, "CHANNELS": channels, "RUN_GROUPS": run_groups})
    part = torch.empty((batch * run_groups, dim, width + 1), dtype=torch.float32, device=device)
    groups = batch * -(-dim // channels) * run_groups
    # The kernel's threadgroup reduction needs exactly GROUP threads per group: the grid is whole groups.
    launch(device, family, kernel_name(f"{family}_bwd", dtype, width), [*inputs, dx, part, params], groups * GROUP,
           GROUP)
    sums = reduce_rows(part.view(batch * run_groups, dim * (width + 1))).view(dim, width + 1)
    dweight = sums[:, :width].contiguous().to(weight.dtype)
    dbias = sums[:, width].to(bias.dtype) if bias is not None else None
    dinit = None
    if initial_states is not None:
        dinit = torch.empty((state_rows, dim, width - 1), dtype=torch.float32, device=device)
        launch(device, family, kernel_name(f"{family}_bwd_dinit", dtype, "any"), [*inputs, dinit, params],
               dinit.numel())
        dinit = dinit.to(initial_states.dtype)
    return dweight, dbias, dinit


def grads_without_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, initial_states: Tensor | None,
                         dfinal_states: Tensor | None, length: int):
    """(dweight, dbias, dinitial_states) when B == 0 or T == 0: no output depends on the weights, and with
    T == 0 the final states are the initial states, so their gradient passes straight through."""
    dweight = torch.zeros_like(weight)
    dbias = torch.zeros_like(bias) if bias is not None else None
    dinit = None
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
    params = _contract.pack("GATHER", N=n_rows, D=dim, STATE_LEN=state_len, T=length, X_STRIDE_B=strides[0],
                            X_STRIDE_T=strides[1], X_STRIDE_D=strides[2], FLAGS=flags)
    f32, i32, dev = torch.float32, torch.int32, x.device
    # An empty x (T == 0: the states come from initial_states alone) or mask has no buffer: a stand-in
    # is bound instead (never read).
    args = [optional(x, x.dtype, dev), optional(initial_states, f32, dev), optional(mask, f32, dev),
            optional(cu_seqlens, i32, dev), out, params]
    launch(x.device, "states", kernel_name("gather_states", x.dtype), args, out.numel())
    return out


_stand_ins: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def optional(t: Tensor | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`t`, or for an absent or empty input a one-element stand-in of the kernel parameter's element type.

    The kernel never reads a stand-in (the input's flag is off, or its extent is 0); it exists because every
    [[buffer(i)]] must be bound, and an empty tensor has no buffer (nil on MPS). One per (device, dtype),
    allocated once.
    """
    if t is not None and t.numel() > 0:
        return t
    key = (device, dtype)
    stand_in = _stand_ins.get(key)
    if stand_in is None:
        stand_in = _stand_ins[key] = torch.zeros(1, dtype=dtype, device=device)
    return stand_in
