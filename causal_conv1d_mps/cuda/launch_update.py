"""Launcher of the CUDA C++ decode step (`kernels/conv_update.cu`), and where it applies.

The Triton backend asks it first for a decode step in shift mode (no `cache_seqlens`: the caller checks
that); it returns None where the kernel does not apply, and the Triton kernel serves the call:
- `x` `[B, 1, D]` (one token per row), float16 or bfloat16, channels contiguous, 4-byte aligned, its row
  stride even; D even; B within CUDA's grid limit;
- `conv_state` `[B, D, S]` (`[N, D, S]` with `conv_state_indices`) of x's dtype with 1 <= S <= `MAX_STATE`,
  its steps contiguous and its channel stride S (each thread's two channels are S consecutive 32-bit words),
  4-byte aligned, its row stride even;
- `conv_state_indices` None, or int32 `[B]` contiguous (the api's form: negative for a padding row, whose
  output is 0 and whose state is not touched; a slot past N is padding too);
- `weight` `[D, W]` with 1 <= W <= `MAX_WIDTH`, of x's dtype or float32, `bias` of the weight's dtype or
  None, any strides; activation identity or SiLU;
- a CUDA device whose NVRTC compile succeeded, or, for tests only, CPU tensors through `cuda_harness`.
On an H200 (bf16, `python benchmarks/prototypes/cuda_update.py`, docs/PERF_NOTES.md v12) the kernel took
8.2 us at B256 D8192 W4 against the Triton kernel's 16.2 us under CUDA graphs, and was faster at every size
timed (B1 to B256, W 4 and 7, S = W-1 and S = W).

A decode loop calls this once per layer and token, so a launch plan per call signature holds the answer of
the checks and the prepared launch; a call builds the signature, checks the two addresses and allocates out.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _runtime, _source
from .launch import _MAX_GRID_YZ, _UNSEEN, _WT, _X_BF16, _remember, dtypes_width_activation_reason

THREADS = 128  # threads per block, each owning 2 channels
_DEFINES = _source.FILE_DEFINES[_source.file_for("cc_conv_update")]
MAX_WIDTH = _DEFINES["CC_W"][-1]  # the Triton kernels' limit: wider filters go to the reference path first
MAX_STATE = _DEFINES["CC_S"][-1]  # the state's entries of a thread's two channels sit in S registers
_MAX_PLANS = 512  # signatures hold shapes: bound the table for ever-changing batch sizes

_X_LAYOUT = "x: [B, 1, D] with channels contiguous, a row stride of an even number of elements, D even"
_STATE_LAYOUT = "conv_state: [B, D, S] with steps contiguous, channel stride S and an even row stride"


def why_not(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, activation: int,
            conv_state_indices: Tensor | None = None) -> str | None:
    """Why the kernel does not apply to these arguments (None: it does), addresses included; metadata only."""
    reason = _check_signature(x, conv_state, weight, bias, activation, conv_state_indices)
    if reason is None and (x.data_ptr() | conv_state.data_ptr()) & 3:
        return "x and conv_state: 4-byte aligned"
    return reason


def _row_stride(t: Tensor) -> int:
    return 0 if t.shape[0] == 1 else t.stride(0)


def _check_signature(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, activation: int,
                     slots: Tensor | None):
    """`why_not` without the addresses: what a launch plan caches."""
    reason = dtypes_width_activation_reason(x, weight, bias, activation, MAX_WIDTH, "[B, 1, D]")
    if reason is not None:
        return reason
    B, L, D = x.shape
    if L != 1:
        return f"one token per row only, got L = {L}"
    if B == 0 or D == 0 or B > _MAX_GRID_YZ:
        return f"B = {B}, D = {D}: B in 1..{_MAX_GRID_YZ}, D non-zero"
    if D % 2 or x.stride(2) != 1 or _row_stride(x) % 2:
        return _X_LAYOUT
    if slots is not None and (slots.dtype != torch.int32 or slots.shape != (B,) or (B > 1 and slots.stride(0) != 1)):
        return f"conv_state_indices: int32 [B] contiguous, got {tuple(slots.shape)} {slots.dtype}"
    rows = B if slots is None else conv_state.shape[0] if conv_state.dim() == 3 else 0
    if conv_state.dtype != x.dtype or conv_state.dim() != 3 or conv_state.shape[:2] != (rows, D) or rows >= 2**31:
        return f"conv_state: [B or N, D, S] of x's dtype, got {tuple(conv_state.shape)} {conv_state.dtype}"
    S = conv_state.shape[2]
    if not max(1, weight.shape[1] - 1) <= S <= MAX_STATE:
        return f"conv_state: S = {S}, expected W - 1 <= S <= {MAX_STATE} and S >= 1"
    if (S > 1 and conv_state.stride(2) != 1) or conv_state.stride(1) != S or _row_stride(conv_state) % 2:
        return _STATE_LAYOUT
    return None


def _plan(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, activation: int, residual: bool,
          slots: Tensor | None):
    """The prepared launch of this signature, or None where the kernel does not apply."""
    if _check_signature(x, conv_state, weight, bias, activation, slots) is not None:
        return None
    B, _, D = x.shape
    S, W = conv_state.shape[2], weight.shape[1]
    defines = dict(CC_W=W, CC_X_BF16=_X_BF16[x.dtype], CC_WT=_WT[weight.dtype], CC_HAS_BIAS=int(bias is not None),
                   CC_ACTIVATION=activation, CC_RESIDUAL=int(residual), CC_S=S, CC_SLOTS=int(slots is not None))
    fn = _runtime.kernel("cc_conv_update", defines, x.device)
    if fn is None:
        return None
    pairs = D // 2
    out_row = _row_stride(torch.empty_like(x))  # a function of x's shape and strides: even like x's, or D
    ints = (pairs, _row_stride(x) // 2, _row_stride(conv_state) // 2, out_row // 2, weight.stride(0),
            weight.stride(1), 0 if bias is None else bias.stride(0), conv_state.shape[0])
    return fn.prepare((-(-pairs // THREADS), B, 1), (THREADS, 1, 1), 6, ints)


_plans: dict[tuple, object] = {}  # signature -> prepared launch, or None where the kernel does not apply


def conv_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, activation: int,
                residual: bool, conv_state_indices: Tensor | None = None, allow_cpu: bool = False) -> Tensor | None:
    """`(x if residual) + act(bias + conv(state's last W-1 entries, x))` `[B, 1, D]`, with the row's state
    (row b, or slot `conv_state_indices[b]`) shifted by one step in place, its newest entry x; 0 for a padding
    row. None, nothing written, where the kernel does not apply."""
    device = _runtime.launch_device(x, allow_cpu)
    if device is None:
        return None
    key = (x.shape, x.stride(), x.dtype, conv_state.shape, conv_state.stride(), conv_state.dtype, weight.shape,
           weight.stride(), weight.dtype, activation, residual, device,
           None if bias is None else (bias.stride(), bias.dtype),
           None if conv_state_indices is None else (conv_state_indices.shape, conv_state_indices.stride(),
                                                    conv_state_indices.dtype))
    launch = _plans.get(key, _UNSEEN)
    if launch is _UNSEEN:
        launch = _remember(_plans, key, _plan(x, conv_state, weight, bias, activation, residual, conv_state_indices),
                           _MAX_PLANS)
    if launch is None:
        return None
    x_p, s_p = x.data_ptr(), conv_state.data_ptr()
    if (x_p | s_p) & 3:
        return None
    out = torch.empty_like(x)
    b = weight if bias is None else bias  # no kernel argument is ever a nil pointer
    slots = x if conv_state_indices is None else conv_state_indices
    if launch.takes_pointers:
        launch.launch(x_p, s_p, weight.data_ptr(), b.data_ptr(), slots.data_ptr(), out.data_ptr())
    else:
        launch.launch(x, conv_state, weight, b, slots, out)
    return out
