"""Launchers of the channel-last CUDA C++ kernels (`kernels/conv_btd.cu`), and where they apply.

The Triton backend asks them first for the forward and the backward of `short_conv_fused` and of
`causal_conv1d` on a channel-last x; they return False / None where the kernels do not apply (then the Triton
kernels serve the call):
- `x` `[B, T, D]` with D contiguous, float16 or bfloat16, 8-byte aligned, strides over B and T multiples of 4
  elements, D a multiple of 4; `weight` `[D, W]` contiguous with 1 <= W <= 16, of x's dtype or float32, and
  `bias` contiguous of the weight's dtype or None, both 16-byte aligned; activation identity or SiLU;
- `mask` `[B, T]` contiguous, float32, int64, int32 or bool (read as it comes: an HF int64 mask needs no
  conversion kernel), or None; no packed sequences, no `seq_idx`, no initial states (the caller
  checks those);
- `(mask is not None, W)` in `MEASURED_FASTER` (forward) or `BACKWARD_MEASURED_FASTER`: the pairs an H200
  run measured faster than the Triton kernels (docs/PERF_NOTES.md, v8 and v9); elsewhere Triton stays;
- in the backward: `dout` of x's dtype and shape with the layout rules of x, and no gradient of final states
  (the caller checks that);
- a CUDA device whose NVRTC compile succeeded, or, for tests only, CPU tensors through `cuda_harness`.
The forward's scheme (channels and steps per thread, runs without bounds checks) is chosen per mask and width
as measured (`forward_variant`); where x and out are contiguous its variant has D compiled in (one compile per
model width). The backward's likewise has D compiled in where x, dout and dx are contiguous
(`_BWD_COMPILED_D`); its chunks without bounds checks (`_BWD_INSIDE`) measured slower and are off.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import _runtime, _source
from .launch import (_MAX_GRID_YZ, _UNSEEN, _WT, _X_BF16, BackwardPlan, _remember,
                     dtypes_width_activation_reason, gradient_buffers)

VEC = 4  # x's layout unit: D and x's strides over B and T are multiples of VEC elements
THREADS = 64  # CC_BTD_THREADS: the backward's threads per block
FWD_CHANNELS_PER_BLOCK = 256  # the forward's block: 256 // CC_FWD_VEC threads
MAX_WIDTH = 16
# mask dtype -> CC_MASK_T (the generated codes of `_source.MASK_TYPES`)
MASK_DTYPES: dict[torch.dtype, int] = {getattr(torch, name): code for code, name in enumerate(_source.MASK_TYPES)}
_MAX_T = 2**31 - 1 - 64  # the kernels' step indices (t0 + run + W-1, and the mask lanes past it) stay in int
_BWD_MIN_CHUNK = 64  # steps: the W-1 rows read twice at each end of a chunk stay a small share
_BWD_TARGET_BLOCKS = 1024  # the backward splits T into chunks until about this many blocks run
# The backward's techniques taken from the forward, switchable for an A/B on a GPU (read when a plan is built:
# clear `_backward_plans` after changing them; `benchmarks/prototypes/cuda_vs_triton.py --backward-dc`):
_BWD_COMPILED_D = True  # CC_BWD_D: D compiled in where x, dout and dx are contiguous
# CC_BWD_INSIDE: chunks whose rows all lie in [0, T) run without bounds checks. Off: on an H200 it lost to D
# compiled in alone at every row timed (`cuda_vs_triton.py --backward-dc`, docs/PERF_NOTES.md v10; fused with a
# mask at W = 4, B8 T2048: 0.165 against 0.154 ms), the two code copies costing registers; kept switchable
_BWD_INSIDE = False

# (has mask, W) where the kernel beat the Triton kernels on an H200 through the public API (bf16, B4 T8192 D4096
# and B8 T2048 D4096, `python benchmarks/prototypes/cuda_vs_triton.py --channel-last`, docs/PERF_NOTES.md v8):
# every width 2..16, with and without a mask, e.g. channel-last W 4 91.7 against 84.5% of copy, fused with mask
# W 4 81.8 against 65.3%, W 7 61.1 against 34.8%. W = 1 ties or loses (0.93-1.01x): Triton keeps it.
MEASURED_FASTER: frozenset[tuple[bool, int]] = frozenset(
    (has_mask, W) for has_mask in (False, True) for W in range(2, MAX_WIDTH + 1))


# (has mask, W) where the backward beat the Triton kernels on an H200 (bf16, B8 T2048 D4096 and B4 T8192 D4096,
# `python benchmarks/prototypes/cuda_vs_triton.py --channel-last-backward`, docs/PERF_NOTES.md v9): 1.1-3.5x at
# every width timed (1-8, 10, 12, 16, with and without a mask); the widths between were not timed one by one.
BACKWARD_MEASURED_FASTER: frozenset[tuple[bool, int]] = frozenset(
    (has_mask, W) for has_mask in (False, True) for W in range(1, MAX_WIDTH + 1))


def why_not(x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None, activation: int) -> str | None:
    """Why the kernel does not apply to `x` `[B, T, D]` and these arguments (None: it does); metadata only."""
    reason = _check_signature(x, weight, bias, mask, activation)[0]
    if reason is None and not _aligned(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr()):
        return _ALIGNMENT
    return reason


_ALIGNMENT = "x 8-byte aligned, weight and bias 16-byte aligned"


def _aligned(x_p: int, weight_p: int, bias_p: int | None) -> bool:
    return not (x_p & 7 or weight_p & 15 or (bias_p is not None and bias_p & 15))


def _check_signature(x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None, activation: int):
    """`why_not` without the addresses (what a launch plan caches): (the reason or None, x's vector strides
    where the kernel applies)."""
    reason = dtypes_width_activation_reason(x, weight, bias, activation, MAX_WIDTH, "[B, T, D]")
    if reason is not None:
        return reason, None
    B, T, D = x.shape
    if B == 0 or T == 0 or D == 0 or D % VEC != 0:
        return f"D = {D}: a positive multiple of {VEC} only (B = {B}, T = {T} non-zero)", None
    if B > _MAX_GRID_YZ or -(-D // (VEC * THREADS)) > _MAX_GRID_YZ or T > _MAX_T:
        return f"B = {B}, D = {D}, T = {T}: beyond the grid's limits", None
    strides = _vector_strides(x)
    if strides is None:
        return "x: D contiguous, strides over B and T multiples of 4", None
    if not weight.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        return "weight and bias: contiguous", None
    if mask is not None and (mask.dtype not in MASK_DTYPES or not mask.is_contiguous() or mask.shape != (B, T)):
        return "mask: [B, T] contiguous, float32, int64, int32 or bool", None
    return None, strides


def _vector_strides(t: Tensor) -> tuple[int, int] | None:
    """`t`'s strides over B and T in units of VEC elements (0 for a dimension of size 1), or None if D is not
    contiguous in whole vectors. The address itself is each call's to check."""
    B, T, D = t.shape
    sb, st, sd = t.stride()
    sb, st = (0 if B == 1 else sb), (0 if T == 1 else st)
    if (sd != 1 and D > 1) or sb % VEC != 0 or st % VEC != 0 or max(sb, st) // VEC >= 2**31:
        return None
    return sb // VEC, st // VEC


def _mask_code(mask: Tensor | None) -> int:
    """CC_MASK_T of `mask` (float32's code where there is none: the kernel never reads it)."""
    return 0 if mask is None else MASK_DTYPES[mask.dtype]


def preferred(has_mask: bool, W: int) -> bool:
    """Whether an H200 run measured this kernel faster than Triton's for this case (`MEASURED_FASTER`)."""
    return (has_mask, W) in MEASURED_FASTER


def preferred_for_backward(has_mask: bool, W: int) -> bool:
    """Whether an H200 run measured the backward faster than Triton's (`BACKWARD_MEASURED_FASTER`)."""
    return (has_mask, W) in BACKWARD_MEASURED_FASTER


class ForwardVariant(NamedTuple):
    """The forward's scheme (`kernels/conv_btd.cu`, its defines)."""
    vec: int      # CC_FWD_VEC: channels per thread
    run: int      # CC_FWD_RUN: steps per thread
    inside: bool  # CC_FWD_INSIDE: runs inside [0, T) take a copy of the code without bounds checks


def forward_variant(has_mask: bool, W: int, d_const: bool) -> ForwardVariant:
    """The forward's scheme for this mask and width; `d_const`: D is compiled in (CC_D; x and out contiguous).

    Measured on an H200 (`benchmarks/prototypes/cuda_btd_wide.py`, `docs/results/h200-bf16-btd-wide-prototype.log`,
    docs/PERF_NOTES.md v9): bf16, bias, SiLU; fused = HF mask and residual; % of copy at B4 T8192 D4096, (B4
    T2048 D4096) in parentheses. The prototype's names: `lazy-v4r8` = 4 channels x 8 steps, `v2r32` = 2 x 32,
    `-m3` the mask's warp vote, `-dc` D compiled in, `-in` runs without bounds checks; the kernel before them
    (4 x 8, plain conversions, mask loaded per thread) is "shipped".
    - D compiled in, fused with a mask:
      - 4 x 8 up to W = 6: W 4 94.0 (90.5) against shipped 86.7 (81.0); W 5 94.3 (89.3) against 72.4 (67.8);
        W 6 91.6 (85.8) against 65.7 (59.1) (2 x 32 tied there: 91.5 (85.8)).
      - 2 x 32 from W = 7: W 7 92.1 (85.0) against 4 x 8's 84.3 (79.1); W 8 87.4 (80.2) against 77.8 (73.8);
        W 10 84.7 (78.2); W 12 81.3 (74.4); W 16 67.0 (62.6) against shipped 23.2 (22.5).
      - without bounds checks inside [0, T) from W = 5: W 4 93.8 (90.1) with, 94.0 (90.5) without; W 5 94.3
        (89.3) and 94.3 (89.2); W 6 91.6 (85.8) and 90.4 (84.0); W 12 81.3 (74.4) and 78.9 (72.4); W 16 67.0
        (62.6) and 58.0 (54.3).
    - D compiled in, no mask:
      - 4 x 8 up to W = 6: W 5 94.2 (89.2), W 6 93.1 (87.9) against 2 x 32's 91.0 (84.4).
      - 2 x 32 from W = 7: W 7 90.6 (83.5), a tie with 4 x 8's 90.1 (84.0); W 8 91.0 (83.4) against 80.1 (76.5);
        W 10 88.8 (79.3); W 12 80.8 (73.0); W 16 57.8 (54.0) against shipped 31.4 (31.9).
      - without bounds checks only from W = 13: it lost below (W 5 93.5 (86.1) against 94.2 (89.2); W 8 89.2
        (83.8) against 91.0 (83.4); W 12 78.8 (73.0) against 80.8 (73.0)) and won at W 16 (57.8 (54.0)
        against 54.1 (51.3)); W 13-15 were not timed.
    - Runtime strides (views), without bounds-check-free runs (not timed), B4 T8192 only:
      - fused: 4 x 8 up to W = 5 (85.1 against 2 x 32's 80.3), 2 x 32 from W = 6 (W 6 78.5 against 75.2, W 8
        76.8 against 62.4);
      - no mask: 4 x 8 up to W = 9 (W 8 75.7 against 71.7), 2 x 32 from W = 10 (W 10 61.6 against 61.3, W 12
        62.0 against 61.5, W 16 50.4 against 30.1).
    W 9, 11 and 13-15 were not timed there; they take the scheme of the nearest rule above.
    - D compiled in, 2 x 16 (session 8, `benchmarks/prototypes/cuda_btd_forward_sweep.py`, B4 T2048 D4096,
      `docs/results/h200-bf16-channel-last-forward-sweep-session8.log`; `do_bench` terms, lower than bench.py's):
      fewer registers than 2 x 32 (sm_90 W = 16 fused: 95 against 136) for more halo rows per output. It won
      from W = 7 to W = 11 in all three ops (fused: W 7 78.4 against 76.7, W 8 77.6 against 75.6, W 11 70.9
      against 68.2; with a mask W 8 77.7 against the shipped 67.9, which the session 7 sweep had flagged too;
      plain W 11 69.7 against 68.0), tied at W = 12 and lost from W = 14 (W 16 fused 49.8 against 52.8). Its
      runs without bounds checks won from W = 9 (fused W 11 70.9 against 68.4, with a mask W 10 70.8 against
      67.5) and tied or lost below."""
    if d_const:
        if W <= 6:
            return ForwardVariant(4, 8, has_mask and W >= 5)
        if W <= (11 if has_mask else 12):
            return ForwardVariant(2, 16, W >= 9)
        return ForwardVariant(2, 32, True)
    vec = 4 if W <= (5 if has_mask else 9) else 2
    return ForwardVariant(vec, 8 if vec == 4 else 32, False)


_MAX_PLANS = 512  # signatures hold shapes: a model with ever-changing lengths must not grow the table
_plans: dict[tuple, object] = {}  # signature -> prepared launch, or None where the kernel does not apply


def _plan(x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None, activation: int, residual: bool,
          out: Tensor):
    """The prepared launch for this call signature (grid, block, integers fixed), or None. Where x and out
    are contiguous the variant has D compiled in (one compile per model width: plans are per shape anyway)."""
    out_strides = _vector_strides(out) if out.shape == x.shape else None
    reason, x_strides = _check_signature(x, weight, bias, mask, activation)
    if out_strides is None or reason is not None:
        return None
    B, T, D = x.shape
    W = weight.shape[1]
    d_const = x.is_contiguous() and out.is_contiguous()
    variant = forward_variant(mask is not None, W, d_const)
    if d_const:
        strides = [0, 0, 0, 0]  # the kernel has them compiled in
    else:
        strides = [s * (VEC // variant.vec) for s in (*x_strides, *out_strides)]  # in the variant's rows
        if max(strides) >= 2**31:
            return None
    defines = dict(CC_W=W, CC_X_BF16=_X_BF16[x.dtype], CC_WT=_WT[weight.dtype], CC_HAS_BIAS=int(bias is not None),
                   CC_ACTIVATION=activation, CC_HAS_MASK=int(mask is not None), CC_MASK_T=_mask_code(mask),
                   CC_RESIDUAL=int(bool(residual)),
                   CC_FWD_VEC=variant.vec, CC_FWD_RUN=variant.run, CC_FWD_INSIDE=int(variant.inside),
                   CC_D=D if d_const else 0)
    fn = _runtime.kernel("cc_conv_fwd_btd", defines, x.device)
    if fn is None:
        return None
    dv = D // variant.vec
    threads = FWD_CHANNELS_PER_BLOCK // variant.vec
    return fn.prepare((-(-T // variant.run), -(-dv // threads), B), (threads, 1, 1), 5, (T, dv, *strides))


def conv_fwd_btd(x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None, activation: int,
                 residual: bool, out: Tensor, allow_cpu: bool = False) -> bool:
    """Write `(x if residual) + act(bias + conv(x masked))` into `out` `[B, T, D]` (D contiguous, the layout
    rules of x); True, or False (nothing written) where the kernel does not apply. A launch plan is kept per
    call signature; each call checks only the addresses."""
    device = _runtime.launch_device(x, allow_cpu)
    if device is None:
        return False
    key = (x.shape, x.stride(), x.dtype, weight.shape, weight.stride(), weight.dtype, activation, bool(residual),
           device, out.shape, out.stride(), None if bias is None else (bias.shape, bias.stride(), bias.dtype),
           None if mask is None else (mask.shape, mask.stride(), mask.dtype))
    launch = _plans.get(key, _UNSEEN)
    if launch is _UNSEEN:
        launch = _remember(_plans, key, _plan(x, weight, bias, mask, activation, residual, out), _MAX_PLANS)
    if launch is None:
        return False
    b = weight if bias is None else bias  # no kernel argument is ever a nil pointer
    m = x if mask is None else mask
    x_p, w_p, b_p, o_p = x.data_ptr(), weight.data_ptr(), b.data_ptr(), out.data_ptr()
    if not _aligned(x_p | o_p, w_p, b_p):
        return False
    if launch.takes_pointers:
        launch.launch(x_p, w_p, b_p, m.data_ptr(), o_p)
    else:
        launch.launch(x, weight, b, m, out)
    return True


_backward_plans: dict[tuple, BackwardPlan | None] = {}


def backward_variant(has_mask: bool, residual: bool, W: int) -> tuple[int, int]:
    """(channels per thread, rows per batch) of the backward (CC_BWD_VEC, CC_BWD_RUN). Measured on an H200
    (bf16, B8 T2048 D4096, `python benchmarks/prototypes/cuda_vs_triton.py --backward-sweep` and
    `--channel-last-backward`, docs/PERF_NOTES.md v9): at W <= 4, 4 channels (8-byte rows) were fastest, by 8
    rows for the plain conv and by 4 where the mask's or the residual's window adds registers (W = 4 fused
    with a mask: 0.177 against 0.250 ms; without a mask, 8 rows took 0.231 ms against Triton's 0.192); from
    W = 5 on the windows of 4 channels spill, and 2 channels by 8 rows won (W = 7: 0.230 against 0.291 ms)."""
    if W <= 4:
        return 4, 4 if has_mask or residual else 8
    return 2, 8


def _chunking(T: int, blocks_per_chunk_row: int, run: int) -> tuple[int, int]:
    """(chunk length in steps, number of chunks): enough blocks to fill the GPU, chunks of at least
    `_BWD_MIN_CHUNK` steps (or all of T), in whole batches of `run` rows."""
    chunks = max(1, min(-(-_BWD_TARGET_BLOCKS // blocks_per_chunk_row), -(-T // _BWD_MIN_CHUNK)))
    chunk = -(-T // chunks)
    chunk = -(-chunk // run) * run
    return chunk, -(-T // chunk)


def _plan_backward(x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None, dout: Tensor,
                   activation: int, residual: bool, dx: Tensor) -> BackwardPlan | None:
    """The prepared launches of the backward for this call signature, or None. Where x, dout and dx are
    contiguous (and `_BWD_COMPILED_D`) the variant has D compiled in (one compile per model width)."""
    reason, x_strides = _check_signature(x, weight, bias, mask, activation)
    if reason is not None or dout.dtype != x.dtype or dout.shape != x.shape or dx.shape != x.shape:
        return None
    dout_strides, dx_strides = _vector_strides(dout), _vector_strides(dx)
    if dout_strides is None or dx_strides is None or dx.dtype != x.dtype:
        return None
    B, T, D = x.shape
    W = weight.shape[1]
    vec, run = backward_variant(mask is not None, bool(residual), W)
    d_const = _BWD_COMPILED_D and x.is_contiguous() and dout.is_contiguous() and dx.is_contiguous()
    if d_const:
        strides = [0] * 6  # the kernel has them compiled in
    else:
        in_words = VEC // vec  # the checks' strides are in units of VEC elements
        strides = [s * in_words for s in (*x_strides, *dout_strides, *dx_strides)]
        if max(strides) >= 2**31:  # in 2-channel words they may pass the kernel's int
            return None
    defines = dict(CC_W=W, CC_X_BF16=_X_BF16[x.dtype], CC_WT=_WT[weight.dtype], CC_HAS_BIAS=int(bias is not None),
                   CC_ACTIVATION=activation)
    fn = _runtime.kernel("cc_conv_bwd_btd", dict(defines, CC_HAS_MASK=int(mask is not None),
                                                 CC_MASK_T=_mask_code(mask), CC_RESIDUAL=int(bool(residual)),
                                                 CC_BWD_VEC=vec, CC_BWD_RUN=run, CC_BWD_INSIDE=int(_BWD_INSIDE),
                                                 CC_BWD_D=D if d_const else 0),
                         x.device)
    reduce = _runtime.kernel("cc_reduce_partials", defines, x.device) if fn is not None else None
    if reduce is None:
        return None
    dv = D // vec
    blocks_y = -(-dv // THREADS)
    chunk, chunks = _chunking(T, blocks_y * B, run)
    conv = fn.prepare((chunks, blocks_y, B), (THREADS, 1, 1), 7, (T, dv, chunk, B, *strides))
    reduce = reduce.prepare((-(-D * (W + 1) // 256), 1, 1), (256, 1, 1), 3, (chunks * B, D))
    return BackwardPlan(conv, reduce, chunks * B * D * (W + 1), (D, W))


def conv_bwd_btd(x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None, dout: Tensor,
                 activation: int, residual: bool, dx: Tensor,
                 allow_cpu: bool = False) -> tuple[Tensor, Tensor | None] | None:
    """Write the gradient of `conv_fwd_btd`'s input into `dx` `[B, T, D]` (the layout rules of x) and return
    (dweight `[D, W]` of weight's dtype, dbias `[D]` or None without a bias), or None (nothing written) where
    the kernels do not apply. `dout` `[B, T, D]`: x's dtype, the layout rules of x. A plan is kept per call signature."""
    device = _runtime.launch_device(x, allow_cpu)
    if device is None:
        return None
    key = (x.shape, x.stride(), x.dtype, weight.shape, weight.stride(), weight.dtype, activation, bool(residual),
           device, dout.shape, dout.stride(), dout.dtype, dx.shape, dx.stride(), dx.dtype,
           None if bias is None else (bias.shape, bias.stride(), bias.dtype),
           None if mask is None else (mask.shape, mask.stride(), mask.dtype))
    plan = _backward_plans.get(key, _UNSEEN)
    if plan is _UNSEEN:
        plan = _remember(_backward_plans, key, _plan_backward(x, weight, bias, mask, dout, activation, residual, dx),
                         _MAX_PLANS)
    if plan is None:
        return None
    x_p, w_p, dout_p, dx_p = x.data_ptr(), weight.data_ptr(), dout.data_ptr(), dx.data_ptr()
    if not _aligned(x_p | dout_p | dx_p, w_p, None if bias is None else bias.data_ptr()):
        return None
    partials, dweight, dbias, b, db = gradient_buffers(plan, x, weight, bias)
    m = x if mask is None else mask
    if plan.pointers:
        partials_p = partials.data_ptr()
        plan.conv(x_p, w_p, b.data_ptr(), m.data_ptr(), dout_p, dx_p, partials_p)
        plan.reduce(partials_p, dweight.data_ptr(), db.data_ptr())
    else:
        plan.conv(x, weight, b, m, dout, dx, partials)
        plan.reduce(partials, dweight, db)
    return dweight, dbias
