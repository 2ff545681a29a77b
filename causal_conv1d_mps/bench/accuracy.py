"""Checks results against the float64 oracle, channel block by channel block.

The ops are depthwise, so every output channel (and its weight/bias gradient) depends only on
the same input channel: the check runs over blocks of channels, which bounds the float64 memory
of the oracle on the large shapes to a few hundred MB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# docs/CONTRACT.md section 6: relative Frobenius error against float64, outputs and every gradient.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
BLOCK_ELEMENTS = 1 << 24  # float64 elements of one input tensor per block


@dataclass(frozen=True)
class Verdict:
    rel_err: float  # the largest relative error over the outputs checked
    worst: str  # the output that had it
    exact_ok: bool  # every output that must match exactly does
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.exact_ok and math.isfinite(self.rel_err) and self.rel_err <= self.tolerance


def _block(t: torch.Tensor | None, dim: int | None, start: int, size: int) -> torch.Tensor | None:
    if t is None:
        return None
    part = t if dim is None else t.narrow(dim, start, size)
    return part.detach().cpu().to(torch.float64)  # to CPU first: MPS has no float64


def check(case, inputs, results) -> Verdict:
    """`inputs` as they were before the call (the decode state is mutated), `results` the call's tuple."""
    dim = case.spec.D
    x = inputs["x"]
    per_channel = max(1, x.numel() // max(dim, 1))
    block = max(1, BLOCK_ELEMENTS // per_channel)
    err2 = [0.0] * len(case.outputs)
    ref2 = [0.0] * len(case.outputs)
    exact_ok = True
    for start in range(0, dim, block):
        size = min(block, dim - start)
        inputs64 = {k: _block(v, case.input_channel_dims.get(k), start, size) for k, v in inputs.items()}
        expected = case.reference(inputs64)
        for i, (spec, got, ref) in enumerate(zip(case.outputs, results, expected)):
            got64 = _block(got, spec.channel_dim, start, size)
            if tuple(got64.shape) != tuple(ref.shape):
                raise ValueError(f"{spec.name}: shape {tuple(got64.shape)}, expected {tuple(ref.shape)}")
            err2[i] += float((got64 - ref).square().sum())
            ref2[i] += float(ref.square().sum())
            if spec.exact and not torch.equal(got64, ref):
                exact_ok = False
    errors = [math.sqrt(e / r) if r > 0 else math.sqrt(e) for e, r in zip(err2, ref2)]
    errors = [e if math.isfinite(e) else math.inf for e in errors]
    worst = max(range(len(errors)), key=lambda i: errors[i])
    return Verdict(errors[worst], case.outputs[worst].name, exact_ok, TOLERANCE[case.dtype])
