"""Minimum memory traffic of each op, in bytes, as defined in docs/PERFORMANCE.md section 2.

These depthwise convolutions do about 2*W flops per element and are bound by memory bandwidth,
so achieved bandwidth = these bytes / time is the figure of merit. Weights and bias are
negligible and not counted.
"""

from __future__ import annotations


def forward_bytes(batch: int, seqlen: int, dim: int, elem_size: int) -> int:
    """Forward of `causal_conv1d` or `short_conv_fused`: read `x`, write `out`."""
    return 2 * batch * seqlen * dim * elem_size


def mask_bytes(batch: int, seqlen: int, mask_elem_size: int) -> int:
    """An attention mask `[B, T]` read once per pass."""
    return batch * seqlen * mask_elem_size


def forward_backward_bytes(batch: int, seqlen: int, dim: int, elem_size: int) -> int:
    """Forward + backward: forward reads `x` and writes `out`; backward reads `x` and `dout`, writes `dx`."""
    return 5 * batch * seqlen * dim * elem_size


def decode_bytes(batch: int, dim: int, width: int, elem_size: int) -> int:
    """One decode step: read `x`, write `out`, read and write the `W-1` state window."""
    return (2 * batch * dim + 2 * batch * dim * (width - 1)) * elem_size


def copy_bytes(numel: int, elem_size: int) -> int:
    """A device-to-device `copy_` reads and writes every byte."""
    return 2 * numel * elem_size
