"""Launchers of the CUDA C++ kernels of `kernels/conv_bdt.cu`, and where they apply.

The Triton backend asks these first for `causal_conv1d` in the `(B, D, T)` layout; each returns None where
the kernels do not apply (then the Triton kernels serve the call):
- `x` `(B, D, T)` with T contiguous, float16 or bfloat16, 16-byte aligned, strides over B and D multiples
  of 8 elements, T a multiple of 8; weight `[D, W]` with 1 <= W <= 17, of x's dtype or float32, bias of the
  weight's dtype or None; activation identity or SiLU;
- no `seq_idx`, no `initial_states`, and in the backward no gradient of the final states (final states
  themselves are gathered by the caller, as for the Triton kernels);
- B, D and the T chunks within CUDA's grid limits; a CUDA device whose NVRTC compile succeeded
  (`_runtime.unavailable_reason`), or, for tests only, CPU tensors through `cuda_harness`.
Figures and the measurement that chose these kernels: docs/PERF_NOTES.md, v6 (CUDA C++).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _activation
from . import _runtime

THREADS = 128  # CC_THREADS of the kernels: a block's threads, 8 steps each per pass
MAX_WIDTH = 17  # the W-1 steps before (and after) a thread's 8 come from at most two neighbouring vectors
_X_BF16 = {torch.bfloat16: 1, torch.float16: 0}
_WT = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_MAX_GRID_YZ = 65535
_TARGET_BLOCKS = 1024  # the backward splits T into chunks until about this many blocks run


def _vector_strides(t: Tensor) -> tuple[int, int] | None:
    """Strides over B and D in units of 8 elements (0 for a dimension of size 1), or None if T is not
    contiguous in 16-byte vectors."""
    if t.stride(2) != 1 or t.data_ptr() % 16 != 0:
        return None
    out = []
    for dim in (0, 1):
        stride = 0 if t.shape[dim] == 1 else t.stride(dim)
        if stride % 8 != 0 or stride // 8 >= 2**31:
            return None
        out.append(stride // 8)
    return out[0], out[1]


def _new_like_strides(t: Tensor) -> tuple[int, int]:
    """Vector strides of `torch.empty_like(x)` for an `x` the kernels take: it keeps x's strides (dense x) or
    is contiguous (T a multiple of 8), freshly allocated and so aligned: never None."""
    strides = _vector_strides(t)
    assert strides is not None, "empty_like of a vector-aligned x is vector-aligned"
    return strides


def _weight_strides(weight: Tensor, bias: Tensor | None) -> tuple[int, int, int]:
    return weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0


def why_not(x: Tensor, weight: Tensor, bias: Tensor | None, activation: int) -> str | None:
    """Why the kernels do not apply to these arguments (None: they do); metadata only, no device work."""
    return _check(x, weight, bias, activation)[0]


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, activation: int):
    """(why the kernels do not apply or None, x's vector strides where they apply)."""
    if x.dim() != 3 or x.dtype not in _X_BF16:
        return f"x: float16 or bfloat16 (B, D, T) only, got {x.dtype} with {x.dim()} dims", None
    if weight.dtype not in (x.dtype, torch.float32) or (bias is not None and bias.dtype != weight.dtype):
        return "weight and bias: x's dtype or float32, both the same", None
    B, D, T = x.shape
    W = weight.shape[1]
    if not 1 <= W <= MAX_WIDTH:
        return f"W = {W}: 1..{MAX_WIDTH} only", None
    if activation not in (_activation.IDENTITY, _activation.SILU):
        return f"activation code {activation}", None
    if B == 0 or D == 0 or T == 0 or T % 8 != 0 or T // 8 >= 2**31:
        return f"T = {T}: a positive multiple of 8 only (B = {B}, D = {D} non-zero)", None
    if B > _MAX_GRID_YZ or D > _MAX_GRID_YZ:
        return f"B = {B}, D = {D}: at most {_MAX_GRID_YZ} each (grid)", None
    strides = _vector_strides(x)
    if strides is None:
        return "x: T contiguous, 16-byte aligned, strides over B and D multiples of 8", None
    return None, strides


def preferred_for_forward(T: int, W: int) -> bool:
    """Where the CUDA C++ forward is the faster one (measured on an H200, docs/PERF_NOTES.md v6): everywhere
    from W = 4 up; at W = 2 and 3 Triton's run kernel (which serves T >= 1024) is as fast or faster."""
    return W >= 4 or T < 1024


def _defines(x: Tensor, weight: Tensor, bias: Tensor | None, activation: int) -> dict[str, int]:
    return dict(CC_W=weight.shape[1], CC_X_BF16=_X_BF16[x.dtype], CC_WT=_WT[weight.dtype],
                CC_HAS_BIAS=int(bias is not None), CC_ACTIVATION=activation)


def _usable(x: Tensor, allow_cpu: bool) -> bool:
    return x.device.type == "cuda" or (allow_cpu and x.device.type == "cpu")


def conv_fwd_bdt(x: Tensor, weight: Tensor, bias: Tensor | None, activation: int,
                 allow_cpu: bool = False) -> Tensor | None:
    """`act(bias + conv(x))` `[B, D, T]` (zeros before t = 0), or None where the kernels do not apply."""
    if not _usable(x, allow_cpu):
        return None
    reason, x_strides = _check(x, weight, bias, activation)
    fn = _runtime.kernel("cc_conv_fwd_bdt", _defines(x, weight, bias, activation), x.device) if not reason else None
    if fn is None:
        return None
    B, D, T = x.shape
    out = torch.empty_like(x)
    n8 = T // 8
    fn(grid=(-(-n8 // THREADS), D, B), block=(THREADS, 1, 1),
       args=[x, weight, bias if bias is not None else weight, out, n8, *x_strides, *_new_like_strides(out),
             *_weight_strides(weight, bias)])
    return out


def conv_bwd_bdt(x: Tensor, weight: Tensor, bias: Tensor | None, dout: Tensor, activation: int,
                 allow_cpu: bool = False) -> tuple[Tensor, Tensor, Tensor] | None:
    """(dx `[B, D, T]`, dweight `[D, W]`, dbias `[D]` or empty) of `conv_fwd_bdt`, or None where the
    kernels do not apply (dout must have x's dtype and a vector layout too)."""
    if not _usable(x, allow_cpu):
        return None
    reason, x_strides = _check(x, weight, bias, activation)
    dout_strides = _vector_strides(dout) if not reason and dout.dtype == x.dtype and dout.shape == x.shape else None
    if dout_strides is None:
        return None
    defines = _defines(x, weight, bias, activation)
    fn = _runtime.kernel("cc_conv_bwd_bdt", defines, x.device)
    reduce = _runtime.kernel("cc_reduce_partials", defines, x.device) if fn is not None else None
    if reduce is None:
        return None
    B, D, T = x.shape
    W = weight.shape[1]
    n8 = T // 8
    # enough blocks to fill the GPU: rows (B * D blocks) split into T chunks of whole passes
    passes = -(-n8 // THREADS)
    chunks = min(passes, max(1, -(-_TARGET_BLOCKS // (B * D))), _MAX_GRID_YZ)
    chunk8 = -(-passes // chunks) * THREADS
    chunks = -(-n8 // chunk8)
    dx = torch.empty_like(x)
    partials = torch.empty(chunks * B, D, W + 1, dtype=torch.float32, device=x.device)
    fn(grid=(D, B, chunks), block=(THREADS, 1, 1),
       args=[x, weight, bias if bias is not None else weight, dout, dx, partials, n8, chunk8, B, D,
             *x_strides, *dout_strides, *_new_like_strides(dx), *_weight_strides(weight, bias)])
    dweight = torch.empty(D, W, dtype=weight.dtype, device=x.device)
    dbias = torch.empty(D, dtype=bias.dtype, device=x.device) if bias is not None else x.new_empty(0)
    reduce(grid=(-(-D * (W + 1) // 256), 1, 1), block=(256, 1, 1),
           args=[partials, dweight, dbias if bias is not None else dweight, chunks * B, D])
    return dx, dweight, dbias
