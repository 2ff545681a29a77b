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
Figures and the measurements that chose these kernels: docs/PERF_NOTES.md, v7 and v9.

Small calls are host-bound, so each launcher keeps a launch plan per call signature (shapes, strides and
dtypes of every tensor, bias presence, activation, device): the answer of the applicability check, the
variant's kernels with grid, block and integer arguments packed once (`prepare` of `_runtime`'s kernels),
and the shapes
of the gradient buffers. A call then builds the signature, checks the 16-byte alignment of its vector
pointers (x, dout, and the fresh out / dx), allocates its outputs and passes the pointers
(docs/CUDA_KERNELS.md, "Launch plans").
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _activation
from . import _runtime

THREADS = 128  # CC_THREADS of the backward: a block's threads, 8 steps per vector (the forward's: forward_layout)
MAX_WIDTH = 17  # the W-1 steps before (and after) a thread's 8 come from at most two neighbouring vectors
_X_BF16 = {torch.bfloat16: 1, torch.float16: 0}
_WT = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_MAX_GRID_YZ = 65535
_TARGET_BLOCKS = 1024  # the backward splits T into chunks until about this many blocks run
_MAX_PLANS = 512  # per launcher: signatures hold shapes, so a model with ever-changing lengths must not grow it
_UNSEEN = object()


def _vector_strides(t: Tensor) -> tuple[int, int] | None:
    """Strides over B and D in units of 8 elements (0 for a dimension of size 1), or None if T is not
    contiguous in 16-byte vectors. The address itself (16-byte aligned?) is each call's to check."""
    if t.stride(2) != 1:
        return None
    out = []
    for dim in (0, 1):
        stride = 0 if t.shape[dim] == 1 else t.stride(dim)
        if stride % 8 != 0 or stride // 8 >= 2**31:
            return None
        out.append(stride // 8)
    return out[0], out[1]


def _weight_strides(weight: Tensor, bias: Tensor | None) -> tuple[int, int, int]:
    return weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0


def why_not(x: Tensor, weight: Tensor, bias: Tensor | None, activation: int) -> str | None:
    """Why the kernels do not apply to these arguments (None: they do); metadata only, no device work."""
    return _check(x, weight, bias, activation)[0]


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, activation: int):
    """(why the kernels do not apply or None, x's vector strides where they apply)."""
    reason, strides = _check_signature(x, weight, bias, activation)
    if reason is None and x.data_ptr() % 16 != 0:
        return _X_LAYOUT, None
    return reason, strides


_X_LAYOUT = "x: T contiguous, 16-byte aligned, strides over B and D multiples of 8"


def dtypes_width_activation_reason(x: Tensor, weight: Tensor, bias: Tensor | None, activation: int,
                                   max_width: int, layout: str) -> str | None:
    """The checks both CUDA C++ launchers make first (x `layout`, e.g. "(B, D, T)"): 16-bit x of 3 dims,
    weight and bias of x's dtype or float32, 1 <= W <= `max_width`, identity or SiLU. None: they pass."""
    if x.dim() != 3 or x.dtype not in _X_BF16:
        return f"x: float16 or bfloat16 {layout} only, got {x.dtype} with {x.dim()} dims"
    if weight.dtype not in (x.dtype, torch.float32) or (bias is not None and bias.dtype != weight.dtype):
        return "weight and bias: x's dtype or float32, both the same"
    W = weight.shape[1]
    if not 1 <= W <= max_width:
        return f"W = {W}: 1..{max_width} only"
    if activation not in (_activation.IDENTITY, _activation.SILU):
        return f"activation code {activation}"
    return None


def _check_signature(x: Tensor, weight: Tensor, bias: Tensor | None, activation: int):
    """`_check` without x's address: what a launch plan caches."""
    reason = dtypes_width_activation_reason(x, weight, bias, activation, MAX_WIDTH, "(B, D, T)")
    if reason is not None:
        return reason, None
    B, D, T = x.shape
    if B == 0 or D == 0 or T == 0 or T % 8 != 0 or T // 8 >= 2**31:
        return f"T = {T}: a positive multiple of 8 only (B = {B}, D = {D} non-zero)", None
    if B > _MAX_GRID_YZ or D > _MAX_GRID_YZ:
        return f"B = {B}, D = {D}: at most {_MAX_GRID_YZ} each (grid)", None
    strides = _vector_strides(x)
    if strides is None:
        return _X_LAYOUT, None
    return None, strides


def forward_layout(T: int, W: int) -> tuple[int, int]:
    """(16-byte vectors per thread, threads per block) of the forward (CC_VPT, CC_FWD_THREADS). Measured on an
    H200 (bf16, B4 D4096 T8192 and B8 D2048 T4096, `python benchmarks/prototypes/cuda_bdt_fwd.py`,
    docs/PERF_NOTES.md v9): 2 vectors were fastest up to W = 8 (W = 4: 96.2 / 91.2% of copy against 90.1 /
    87.0% for one), 4 from W = 9 on, where they held 93.6% at W = 12 and 82% at W = 16 (2 vectors: 82 and
    70%). A block of 128 threads with 4 vectors each spans 4096 steps: on shorter rows half of it idled
    (bench.py, B4 D4096 T2048: W = 10 at 73%), so rows shorter than a 128-thread block take 64-thread
    blocks, and rows shorter than a 64-thread block of 4 vectors take 2."""
    vectors = 4 if W >= 9 else 2
    n8 = T // 8
    if vectors * 128 <= n8:
        return vectors, 128
    if vectors == 4 and vectors * 64 > n8:
        vectors = 2
    return vectors, 64


def _defines(x: Tensor, weight: Tensor, bias: Tensor | None, activation: int) -> dict[str, int]:
    return dict(CC_W=weight.shape[1], CC_X_BF16=_X_BF16[x.dtype], CC_WT=_WT[weight.dtype],
                CC_HAS_BIAS=int(bias is not None), CC_ACTIVATION=activation)


class _ForwardPlan:
    """What a forward call of one signature needs beyond its pointers."""

    __slots__ = ("launch", "pointers")

    def __init__(self, prepared):
        self.launch = prepared.launch  # (x, weight, bias or weight, out): pointers, or tensors (the harness)
        self.pointers = prepared.takes_pointers


class BackwardPlan:
    """What a backward call of one signature needs beyond its pointers (both launchers' backwards): the conv
    launch, the fixed-order reduction of the weight gradient (None where the conv launch writes the gradient
    itself), and the sizes of the buffers it allocates (the float32 partial sums `[chunks * B, D, W + 1]`,
    flat, 0 without a reduction; dweight `[D, W]`)."""

    __slots__ = ("conv", "reduce", "pointers", "partials", "dweight")

    def __init__(self, conv, reduce, partials: int, dweight: tuple[int, int]):
        # (x, weight, bias or weight, [mask or x: channel-last], dout, dx, partials, [(B, D, T): dweight, dbias])
        self.conv = conv.launch
        self.reduce = None if reduce is None else reduce.launch  # (partials, dweight, dbias or dweight)
        self.pointers = conv.takes_pointers
        self.partials, self.dweight = partials, dweight


def _remember(plans: dict, key: tuple, plan, limit: int):
    """Keeps `plan` (None included: the kernels do not apply) under `key` in a table of at most `limit`
    signatures (the launchers' plan tables; full, it starts over); returns it."""
    if len(plans) >= limit:
        plans.clear()
    plans[key] = plan
    return plan


_forward_plans: dict[tuple, _ForwardPlan | None] = {}  # None: the kernels do not apply to that signature
_backward_plans: dict[tuple, BackwardPlan | None] = {}


def _plan_forward(x: Tensor, weight: Tensor, bias: Tensor | None, activation: int) -> _ForwardPlan | None:
    reason, x_strides = _check_signature(x, weight, bias, activation)
    vectors, threads = forward_layout(x.shape[2], weight.shape[1])
    fn = _runtime.kernel("cc_conv_fwd_bdt", dict(_defines(x, weight, bias, activation), CC_VPT=vectors,
                                                 CC_FWD_THREADS=threads), x.device) if not reason else None
    if fn is None:
        return None
    B, D, T = x.shape
    n8 = T // 8
    out_strides = _new_like_strides(x)
    launch = fn.prepare((-(-n8 // (threads * vectors)), D, B), (threads, 1, 1), 4,
                        (n8, *x_strides, *out_strides, *_weight_strides(weight, bias)))
    return _ForwardPlan(launch)


def _new_like_strides(x: Tensor) -> tuple[int, int]:
    """Vector strides of `torch.empty_like(x)` (a function of x's shape and strides) for an `x` the kernels
    take: it keeps x's strides (dense x) or is contiguous (T a multiple of 8): never None."""
    strides = _vector_strides(torch.empty_like(x))
    assert strides is not None, "empty_like of a vector-strided x is vector-strided"
    return strides


def _plan_backward(x: Tensor, weight: Tensor, bias: Tensor | None, dout: Tensor,
                   activation: int) -> BackwardPlan | None:
    reason, x_strides = _check_signature(x, weight, bias, activation)
    dout_strides = _vector_strides(dout) if not reason and dout.dtype == x.dtype and dout.shape == x.shape else None
    if dout_strides is None:
        return None
    B, D, T = x.shape
    W = weight.shape[1]
    n8 = T // 8
    # enough blocks to fill the GPU: rows (B * D blocks) split into T chunks of whole passes
    passes = -(-n8 // THREADS)
    chunks = min(passes, max(1, -(-_TARGET_BLOCKS // (B * D))), _MAX_GRID_YZ)
    chunk8 = -(-passes // chunks) * THREADS
    chunks = -(-n8 // chunk8)
    defines = _defines(x, weight, bias, activation)
    fn = _runtime.kernel("cc_conv_bwd_bdt", defines, x.device)
    if fn is None:
        return None
    conv = fn.prepare((D, B, chunks), (THREADS, 1, 1), 8,
                      (n8, chunk8, B, D, *x_strides, *dout_strides, *_new_like_strides(x),
                       *_weight_strides(weight, bias)))
    # one partial row per channel (B = 1, one chunk): the conv kernel writes the gradient, one launch fewer
    if chunks * B == 1:
        return BackwardPlan(conv, None, 0, (D, W))
    reduce = _runtime.kernel("cc_reduce_partials", defines, x.device)
    if reduce is None:
        return None
    reduce = reduce.prepare((-(-D * (W + 1) // 256), 1, 1), (256, 1, 1), 3, (chunks * B, D))
    return BackwardPlan(conv, reduce, chunks * B * D * (W + 1), (D, W))


def gradient_buffers(plan: BackwardPlan, x: Tensor, weight: Tensor, bias: Tensor | None):
    """(partials, dweight, dbias, the bias or its stand-in, dbias or its stand-in) of a backward call: the
    flat float32 partial sums (dweight where the plan has no reduction: the kernel then leaves them alone),
    dweight `[D, W]` contiguous in the weight's dtype (the reduction writes it so), dbias `[D]`, or None
    without a bias (no placeholder is allocated); no kernel argument is ever a nil pointer, so an absent bias
    passes the weight and its gradient dweight."""
    # (`new_empty` with sizes as separate ints is the cheapest allocation from Python: about 0.9 us)
    D, W = plan.dweight
    dweight = weight.new_empty(D, W)
    partials = x.new_empty(plan.partials, dtype=torch.float32) if plan.partials else dweight
    if bias is None:
        return partials, dweight, None, weight, dweight
    dbias = weight.new_empty(D)  # bias has weight's dtype
    return partials, dweight, dbias, bias, dbias


def conv_fwd_bdt(x: Tensor, weight: Tensor, bias: Tensor | None, activation: int,
                 allow_cpu: bool = False) -> Tensor | None:
    """`act(bias + conv(x))` `[B, D, T]` (zeros before t = 0), or None where the kernels do not apply."""
    device = _runtime.launch_device(x, allow_cpu)
    if device is None:
        return None
    if bias is None:
        key = (x.shape, x.stride(), x.dtype, weight.shape, weight.stride(), weight.dtype, activation, device)
    else:
        key = (x.shape, x.stride(), x.dtype, weight.shape, weight.stride(), weight.dtype, activation, device,
               bias.stride(), bias.dtype)
    plan = _forward_plans.get(key, _UNSEEN)
    if plan is _UNSEEN:
        plan = _remember(_forward_plans, key, _plan_forward(x, weight, bias, activation), _MAX_PLANS)
    if plan is None:
        return None
    xp = x.data_ptr()
    if xp & 15:
        return None
    out = torch.empty_like(x)
    out_p = out.data_ptr()
    if out_p & 15:  # the allocators' blocks are aligned far beyond 16 bytes; checked all the same
        return None
    b = weight if bias is None else bias  # no kernel argument is ever a nil pointer
    if plan.pointers:
        plan.launch(xp, weight.data_ptr(), b.data_ptr(), out_p)
    else:
        plan.launch(x, weight, b, out)
    return out


def conv_bwd_bdt(x: Tensor, weight: Tensor, bias: Tensor | None, dout: Tensor, activation: int,
                 allow_cpu: bool = False) -> tuple[Tensor, Tensor, Tensor] | None:
    """(dx `[B, D, T]`, dweight `[D, W]`, dbias `[D]` or None without a bias) of `conv_fwd_bdt`, or None where the
    kernels do not apply (dout must have x's dtype and a vector layout too)."""
    device = _runtime.launch_device(x, allow_cpu)
    if device is None:
        return None
    if bias is None:
        key = (x.shape, x.stride(), x.dtype, weight.shape, weight.stride(), weight.dtype, activation, device,
               dout.shape, dout.stride(), dout.dtype)
    else:
        key = (x.shape, x.stride(), x.dtype, weight.shape, weight.stride(), weight.dtype, activation, device,
               dout.shape, dout.stride(), dout.dtype, bias.stride(), bias.dtype)
    plan = _backward_plans.get(key, _UNSEEN)
    if plan is _UNSEEN:
        plan = _remember(_backward_plans, key, _plan_backward(x, weight, bias, dout, activation), _MAX_PLANS)
    if plan is None:
        return None
    xp, dout_p = x.data_ptr(), dout.data_ptr()
    if (xp | dout_p) & 15:
        return None
    dx = torch.empty_like(x)
    dx_p = dx.data_ptr()
    if dx_p & 15:
        return None
    partials, dweight, dbias, b, db = gradient_buffers(plan, x, weight, bias)
    if plan.pointers:
        partials_p, dweight_p, db_p = partials.data_ptr(), dweight.data_ptr(), db.data_ptr()
        plan.conv(xp, weight.data_ptr(), b.data_ptr(), dout_p, dx_p, partials_p, dweight_p, db_p)
        if plan.reduce is not None:
            plan.reduce(partials_p, dweight_p, db_p)
    else:
        plan.conv(x, weight, b, dout, dx, partials, dweight, db)
        if plan.reduce is not None:
            plan.reduce(partials, dweight, db)
    return dx, dweight, dbias
