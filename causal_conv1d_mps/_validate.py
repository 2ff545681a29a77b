"""Argument checks of the public functions (docs/CONTRACT.md section 4).

Each check raises before any kernel runs, with a message naming the argument, what was expected and
what was received. Value checks that need the tensor's contents (cu_seqlens, index ranges) run where they
cost no host synchronisation: on CPU tensors always, on GPUs only in eager mode outside CUDA-graph capture.
"""
from __future__ import annotations

import torch
from torch import Tensor

_INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def tensor(name: str, value, *, ndim: int | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")
    return value


def floating(name: str, value: Tensor) -> None:
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (float32, float16, bfloat16), "
                        f"got dtype {value.dtype}")


def integer(name: str, value: Tensor) -> None:
    if value.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name}: expected an integer tensor (int32 or int64), got dtype {value.dtype}")


def shape(name: str, value: Tensor, expected: tuple, meaning: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} {meaning}, got {tuple(value.shape)}")


def on_one_device(*tensors) -> bool:
    """Whether the given tensors (None skipped) share one device: `same_device`'s test, without building
    its keyword dict (every call makes it; `same_device` then names the arguments when it fails)."""
    device = None
    for t in tensors:
        if t is not None:
            if device is None:
                device = t.device
            elif t.device != device:
                return False
    return True


def same_device(**tensors) -> None:
    """Raises ValueError naming every argument's device unless all given tensors share one device."""
    device = None
    for t in tensors.values():
        if t is not None:
            if device is None:
                device = t.device
            elif t.device != device:
                listing = ", ".join(f"{name} on {v.device}" for name, v in tensors.items() if v is not None)
                raise ValueError(f"all tensor arguments must be on one device, got {listing}")


def weight_and_bias(weight, bias, channels: int) -> int:
    """Checks `weight` `(D, W)` and `bias` `(D,)` (floating point); returns W."""
    if not (isinstance(weight, Tensor) and weight.dim() == 2 and weight.is_floating_point()):
        tensor("weight", weight, ndim=2)
        floating("weight", weight)
    rows, width = weight.shape
    if rows != channels:
        raise ValueError(f"weight: expected shape ({channels}, W) for {channels} channels, got {tuple(weight.shape)}")
    if width < 1:
        raise ValueError(f"weight: expected width W >= 1, got shape {tuple(weight.shape)}")
    if bias is not None:
        if not (isinstance(bias, Tensor) and bias.is_floating_point()):
            tensor("bias", bias)
            floating("bias", bias)
        if bias.dim() != 1 or bias.shape[0] != channels:
            shape("bias", bias, (channels,), "(D,)")
    return width


def causal_conv1d_inputs(x, weight, bias, seq_idx, initial_states) -> int:
    """The shape and dtype checks of `causal_conv1d`'s inputs (`x` `[B, D, T]`, `weight` `[D, W]`, `bias`,
    `seq_idx` `[B, T]`, `initial_states` `[B, D, W-1]`), shared by the plain and the context-parallel
    function; returns W. The same-device check stays with the caller, which may have more arguments."""
    tensor("x", x, ndim=3)
    floating("x", x)
    b, d, t = x.shape
    width = weight_and_bias(weight, bias, d)
    if seq_idx is not None:
        tensor("seq_idx", seq_idx, ndim=2)
        integer("seq_idx", seq_idx)
        shape("seq_idx", seq_idx, (b, t), "(B, T)")
    states("initial_states", initial_states, b, d, width, "B")
    return width


def short_conv_fused_inputs(x, weight, bias, attention_mask, initial_states, offsets, *, offsets_end_at_t: bool,
                            states_name: str = "initial_states", native_mask: bool = False):
    """The shape and dtype checks of `short_conv_fused`'s inputs (`x` `[B, T, D]`, `weight` `[D, W]`, `bias`,
    `attention_mask`, `offsets` the `cu_seqlens` `[N+1]` with B == 1, `initial_states` `[N|B, D, W-1]` named
    `states_name`), shared by the plain and the context-parallel function. `offsets_end_at_t`: the values of
    `cu_seqlens` are checked to run from 0 to x's T (False: its form only). Returns (W, the mask normalised to
    `[B, T]` (`mask_dtype`, `native_mask` passed on) or None, N or B). The same-device check stays with the
    caller."""
    tensor("x", x, ndim=3)
    floating("x", x)
    b, t, d = x.shape
    width = weight_and_bias(weight, bias, d)
    mask = None if attention_mask is None else normalize_mask(
        attention_mask, b, t, mask_dtype(x, attention_mask, native_mask))
    rows = b
    if offsets is not None:
        if b != 1:
            raise ValueError(f"x: expected batch size 1 with cu_seqlens (packed sequences), got shape {tuple(x.shape)}")
        rows = cu_seqlens(offsets, t if offsets_end_at_t else None)
    states(states_name, initial_states, rows, d, width, "N" if offsets is not None else "B")
    return width, mask, rows


def states(name: str, value, rows: int, channels: int, width: int, rows_meaning: str) -> None:
    if value is None:
        return
    tensor(name, value, ndim=3)
    floating(name, value)
    shape(name, value, (rows, channels, width - 1), f"({rows_meaning}, D, W-1) for W={width}")


def index_vector(name: str, value, length: int) -> None:
    if value is None:
        return
    tensor(name, value)
    integer(name, value)
    shape(name, value, (length,), "(B,)")


def values_checkable(value: Tensor) -> bool:
    """True where reading the tensor's values costs no capture-unsafe host synchronisation."""
    # under torch.compile a value read is a data-dependent guard (a graph break), on CPU too
    if value.device.type == "meta" or torch.compiler.is_compiling():
        return False
    if value.device.type == "cpu":
        return True
    if value.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def cu_seqlens(value, total: int | None) -> int:
    """Checks `(N+1,)` integer and, given `total`, 0 first, `total` last, non-decreasing; returns N.
    `total=None` checks the form only (context parallelism: offsets of the whole sequence, not the slice)."""
    tensor("cu_seqlens", value, ndim=1)
    integer("cu_seqlens", value)
    if value.shape[0] < 1:
        raise ValueError("cu_seqlens: expected shape (N+1,) with N >= 0, got an empty tensor")
    if total is not None and values_checkable(value):
        cpu = value.detach().to("cpu", torch.int64)
        if int(cpu[0]) != 0 or int(cpu[-1]) != total:
            raise ValueError(f"cu_seqlens: expected to start at 0 and end at T={total}, "
                             f"got first {int(cpu[0])} and last {int(cpu[-1])}")
        if cpu.shape[0] > 1 and bool((cpu[1:] < cpu[:-1]).any()):
            raise ValueError(f"cu_seqlens: expected non-decreasing values, got {cpu.tolist()}")
    return value.shape[0] - 1


def state_indices_in_range(value: Tensor | None, num_states: int) -> None:
    """Rejects indices >= N and a slot named twice where that is free (CPU). On GPUs an index >= N is
    padding and a repeated slot is undefined (two rows would race on one state row), as in any decode cache."""
    if value is None or value.device.type != "cpu" or value.numel() == 0 or not values_checkable(value):
        return
    top = int(value.max())
    if top >= num_states:
        raise ValueError(f"conv_state_indices: expected values < {num_states} (conv_state rows) or negative "
                         f"for padding, got {top}")
    live = torch.sort(value[value >= 0]).values
    repeated = live[1:][live[1:] == live[:-1]]
    if repeated.numel() > 0:
        raise ValueError(f"conv_state_indices: expected distinct slots (negative for padding), got slot "
                         f"{int(repeated[0])} more than once")


# ---------------------------------------------------------------------------------------------------------
# Narrowing index tensors to the int32 the kernels read, without losing a value and without a host sync


def seq_idx_int32(seq_idx: Tensor) -> Tensor:
    """`[B, T]` int32 ids with the same meaning as `seq_idx`: equal where they were equal within a row,
    negative (padding) where they were negative. Ids of int64 are renumbered per row (a sort, no host
    sync), so ids that do not fit int32 (say 0 and 2**32) stay distinct instead of being truncated."""
    if seq_idx.dtype != torch.int64 or seq_idx.numel() == 0:
        return seq_idx.to(torch.int32).contiguous()
    values, order = torch.sort(seq_idx, dim=1)
    starts = torch.ones(values.shape, dtype=torch.int32, device=values.device)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    group = torch.cumsum(starts, dim=1, dtype=torch.int32) - 1
    labels = torch.empty_like(group).scatter_(1, order, group)
    return torch.where(seq_idx < 0, -1, labels)


def circular_positions(cache_seqlens: Tensor, state_len: int) -> Tensor:
    """`cache_seqlens mod S` (Python's non-negative modulo, exact for any int32/int64 value) as int32 in
    [0, S): kernels never see a negative or huge position. On the device, no host sync."""
    if state_len == 0:  # W == 1: no tap reads the state and nothing is written
        return torch.zeros(cache_seqlens.shape, dtype=torch.int32, device=cache_seqlens.device)
    if cache_seqlens.dtype == torch.int32:
        return torch.remainder(cache_seqlens, state_len)  # |result| < S: no int32 overflow
    return torch.remainder(cache_seqlens.long(), state_len).to(torch.int32)


def state_indices_int32(value: Tensor, num_states: int) -> Tensor:
    """`conv_state_indices` as int32; int64 values outside [0, N) become -1 (padding) before narrowing, so
    that, say, -2**32 does not turn into slot 0."""
    if value.dtype == torch.int64:
        value = torch.where((value < 0) | (value >= num_states), -1, value)
    return value.to(torch.int32).contiguous()


# ---------------------------------------------------------------------------------------------------------
# In-place arguments: no element written twice, no input read from memory that the call writes


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _byte_range(t: Tensor) -> tuple[int, int]:
    """`[first byte, one past the last byte)` that `t` can touch (metadata only: no sync)."""
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.numel() * t.element_size()
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (span + 1) * t.element_size()


# (shape, strides) -> the error of `not_self_overlapping` (None: passes); a decode loop checks one state each step
_overlap_verdicts: dict[tuple, str | None] = {}


def _self_overlap_error(shape, strides) -> str | None:
    extent = 1
    for stride, size in sorted((st, sz) for sz, st in zip(shape, strides) if sz > 1):
        if stride < extent:
            return (f"expected a tensor whose elements do not share memory (it is written in place), got shape "
                    f"{tuple(shape)} with strides {tuple(strides)} (e.g. from expand()); pass a .clone()")
        extent += (size - 1) * stride
    return None


def not_self_overlapping(name: str, value: Tensor | None) -> None:
    """Rejects a tensor that is written in place while two of its elements share memory (a stride 0 from
    `expand`, or strides that interleave): the writes would race and corrupt each other.

    Sufficient test: sorted by stride, each dimension's stride must reach past everything the smaller
    strides span. Every view made by slicing, transposing or selecting a dense tensor passes. The verdict
    depends on shape and strides only, so it is kept per (shape, strides)."""
    if value is None:
        return
    if torch.compiler.is_compiling():  # symbolic sizes are not hashable: decide without the table
        error = _self_overlap_error(value.shape, value.stride()) if value.numel() > 1 else None
    else:
        key = (value.shape, value.stride())
        try:
            error = _overlap_verdicts[key]
        except KeyError:
            error = _self_overlap_error(*key) if value.numel() > 1 else None
            if len(_overlap_verdicts) >= 1024:  # bounded for ever-changing shapes
                _overlap_verdicts.clear()
            _overlap_verdicts[key] = error
    if error is not None:
        raise ValueError(f"{name}: {error}")


def not_sharing_memory(name: str, value: Tensor | None, **inputs) -> None:
    """Rejects inputs that share memory with `value`, which the call writes: reading them while the call
    writes would give results that depend on the order of the writes. Compares byte ranges (metadata
    only, a few microseconds on the decode path); skipped where tensors have no addresses (tracing, meta)."""
    if value is not None:
        memory_conflict(name, value, *[item for pair in inputs.items() for item in pair])


def memory_conflict(name: str, value: Tensor, *pairs) -> None:
    """`not_sharing_memory` for a `value` that is not None, the inputs given as alternating `name, tensor`
    arguments (the decode path calls this every step: no keyword dict, no call per input)."""
    if type(value) not in _PLAIN_TENSORS or value.is_meta or torch.compiler.is_compiling():
        return
    numel = value.numel()
    if numel == 0:
        return
    lo = value.data_ptr()
    hi = lo + numel * value.element_size() if value.is_contiguous() else _byte_range(value)[1]
    for i in range(1, len(pairs), 2):
        other = pairs[i]
        if other is None or type(other) not in _PLAIN_TENSORS:
            continue
        o_lo = other.data_ptr()
        if o_lo >= hi:  # starts past the written range: no overlap, whatever its length
            continue
        o_numel = other.numel()
        if o_numel == 0:
            continue
        o_hi = o_lo + o_numel * other.element_size() if other.is_contiguous() else _byte_range(other)[1]
        if lo < o_hi and other.device == value.device:
            other_name = pairs[i - 1]
            raise ValueError(f"{other_name}: shares memory with {name}, which this call writes in place; "
                             f"pass a copy (e.g. {other_name}.clone())")


def byte_extent(t: Tensor) -> int:
    """How many bytes from `t.data_ptr()` `memory_conflict` counts as `t`'s (0 for an empty tensor); it
    depends on shape, strides and dtype only."""
    numel = t.numel()
    if numel == 0:
        return 0
    if t.is_contiguous():
        return numel * t.element_size()
    start, end = _byte_range(t)
    return end - start


def may_conflict(value: Tensor, value_extent: int, tensors: tuple, extents: tuple) -> bool:
    """Whether `memory_conflict` could find one of `tensors` (None skipped) sharing memory with `value`,
    given the `byte_extent`s of all of them (`value_extent` 0: `value` is empty or has no memory). False
    means it would not; True is answered by calling it. Pointer arithmetic only, for a repeated signature
    whose extents are known."""
    if not value_extent:
        return False
    lo = value.data_ptr()
    hi = lo + value_extent
    i = 0
    for other in tensors:
        if other is not None:
            start = other.data_ptr()
            if start < hi and lo < start + extents[i]:
                return True
        i += 1
    return False


def not_leaf_requiring_grad(name: str, value: Tensor) -> None:
    """In-place updates of a leaf that requires grad are refused (as PyTorch refuses them in grad mode)."""
    if value.requires_grad and value.is_leaf and torch.is_grad_enabled():
        raise ValueError(f"{name}: a leaf tensor that requires grad cannot be updated in place; pass "
                         f"{name}.detach() (the decode step treats the state as a constant) or call under "
                         f"torch.no_grad()")


_MASK_FORMS = "(B, T), (1, T), (B, 1), (T, B), or 1-D of length T, B or B*T"
# the mask dtypes the CUDA backend's channel-last kernels read as they come (docs/BACKENDS.md); the Triton
# kernels and the other backends get float32 (float64 for float64 x)
# (the one list: `cuda._source.MASK_TYPES` generates the kernels' codes from it, float32 first)
NATIVE_MASK_DTYPES = (torch.float32, torch.int64, torch.int32, torch.bool)


def mask_dtype(x: Tensor, attention_mask: Tensor, native: bool) -> torch.dtype:
    """The dtype `short_conv_fused`'s normalised mask takes: the mask's own where `native` (the api's call),
    x is a 16-bit CUDA tensor and the CUDA kernels read that dtype (an HF int64 mask then costs no conversion
    kernel per call); else float32, float64 for float64 x."""
    if x.dtype == torch.float64:
        return torch.float64
    if (native and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and attention_mask.dtype in NATIVE_MASK_DTYPES):
        return attention_mask.dtype
    return torch.float32


def normalize_mask(mask, batch: int, length: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Any accepted attention-mask form -> `[B, T]` contiguous in `dtype` (see `mask_dtype`).

    A 1-D mask of length T == B is read as per-time (length T), like a square 2-D mask is read as (B, T).
    """
    tensor("attention_mask", mask)
    if mask.is_complex():
        raise TypeError(f"attention_mask: expected bool, integer or floating dtype, got {mask.dtype}")
    m = mask
    got = tuple(mask.shape)
    if m.dim() == 1:
        n = m.shape[0]
        if n == batch * length:
            m = m.reshape(batch, length)
        elif n == length:
            m = m.reshape(1, length).expand(batch, length)
        elif n == batch:
            m = m.reshape(batch, 1).expand(batch, length)
        else:
            m = None
    elif m.dim() == 2:
        r, c = m.shape
        if (r, c) in ((batch, length), (1, length), (batch, 1)):  # listed forms first: a square mask is (B, T)
            m = m.expand(batch, length)
        elif (r, c) == (length, batch):
            m = m.t()
        elif r in (batch, 1) and c > length:
            m = m[:, c - length:].expand(batch, length)  # a longer mask keeps its last T columns
        else:
            m = None
    else:
        m = None
    if m is None:
        raise ValueError(f"attention_mask: cannot be read as (B, T) = ({batch}, {length}): got shape {got}; "
                         f"accepted forms are {_MASK_FORMS}, with more than T columns keeping the last T")
    return m.to(dtype).contiguous()


# ---------------------------------------------------------------------------------------------------------
# Verdicts of the metadata-only checks, kept per call signature (a decode loop repeats one signature per layer)


class Verdicts(dict):
    """`signature -> verdict` of calls whose metadata-only checks all passed, bounded for ever-changing shapes.

    A signature holds everything those checks read (shapes, strides, dtypes, devices, which optional
    arguments are given, the flags they test), so a call with a known signature would pass them again and
    may skip them. The checks that read data pointers, values or the grad mode run on every call."""

    def __init__(self, limit: int = 256):
        super().__init__()
        self.limit = limit

    def remember(self, signature: tuple, verdict):
        """Keeps `verdict` for `signature`; returns it."""
        if len(self) >= self.limit:
            self.clear()
        self[signature] = verdict
        return verdict


def _slot(t):
    """An optional tensor argument's part of a signature (not None)."""
    if type(t) not in _PLAIN_TENSORS:
        raise TypeError("not a plain tensor")
    return t.shape, t.stride(), t.dtype, t.device


def decode_signature(layout: int, x, conv_state, weight, bias, cache_seqlens, conv_state_indices) -> tuple | None:
    """The signature of a decode step's arguments (`layout` tells the public functions apart), or None where
    the call must take every check: symbolic sizes and fake tensors under torch.compile, tensor subclasses,
    arguments that are not tensors, and a state that requires grad (whose check depends on the grad mode).
    Each optional argument keeps its own slot, None when absent, so that one given in another's place
    cannot match."""
    try:
        if (type(x) not in _PLAIN_TENSORS or type(conv_state) not in _PLAIN_TENSORS
                or type(weight) not in _PLAIN_TENSORS or conv_state.requires_grad
                or torch.compiler.is_compiling()):
            return None
        return (layout, x.shape, x.stride(), x.dtype, x.device,
                conv_state.shape, conv_state.stride(), conv_state.dtype, conv_state.device,
                weight.shape, weight.stride(), weight.dtype, weight.device,
                None if bias is None else _slot(bias),
                None if cache_seqlens is None else _slot(cache_seqlens),
                None if conv_state_indices is None else _slot(conv_state_indices))
    except Exception:  # whatever cannot be read here is for the full checks to report
        return None


_is_compiling = torch.compiler.is_compiling  # a module global: read on every call


def call_signature(tag, x, weight, first, second, third, fourth) -> tuple | None:
    """The signature of a convolution's tensor arguments: `x`, `weight` and the three optional `first`,
    `second`, `third` (shape, dtype, device: what the metadata checks read of them; None when absent), and
    the optional `fourth` with its strides too (`final_states_out`, written in place, is checked for
    self-overlap). `tag` tells the public functions apart. None where the call must take every check (as for
    `decode_signature`).

    The common calls, with at most `first` (a bias), get a flat tuple of 7 or 10 fields; the others one of 11
    with a slot per optional argument. The lengths differ, so no two forms can match."""
    try:
        if second is None and third is None and fourth is None:  # fewer objects to build and to hash
            if (type(x) not in _PLAIN_TENSORS or type(weight) not in _PLAIN_TENSORS or _is_compiling()):
                return None
            if first is None:
                return (tag, x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device)
            if type(first) not in _PLAIN_TENSORS:
                return None
            return (tag, x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device,
                    first.shape, first.dtype, first.device)
        if (type(x) not in _PLAIN_TENSORS or type(weight) not in _PLAIN_TENSORS
                or not (first is None or type(first) in _PLAIN_TENSORS)
                or not (second is None or type(second) in _PLAIN_TENSORS)
                or not (third is None or type(third) in _PLAIN_TENSORS)
                or not (fourth is None or type(fourth) in _PLAIN_TENSORS) or _is_compiling()):
            return None
        # each slot written out (`_slot` without the strides for the read-only ones): a frame fewer each
        return (tag, x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device,
                None if first is None else (first.shape, first.dtype, first.device),
                None if second is None else (second.shape, second.dtype, second.device),
                None if third is None else (third.shape, third.dtype, third.device),
                None if fourth is None else (fourth.shape, fourth.stride(), fourth.dtype, fourth.device))
    except Exception:  # whatever cannot be read here is for the full checks to report
        return None
