"""Float64 definitions the benchmark checks every result against (docs/CONTRACT.md sections 2-3).

Written as shift-and-add over the width, not with `F.conv1d`, so that they also check the eager
baselines, which use `F.conv1d`. Inputs arrive as float64 CPU tensors; all ops are
differentiable, so gradient rows take their reference gradients from autograd.
"""

from __future__ import annotations

import torch


def _silu(pre: torch.Tensor) -> torch.Tensor:
    return pre * torch.sigmoid(pre)


def conv_channel_first(x, weight, bias, silu: bool):
    """`x` `[B, D, T]`, `weight` `[D, W]`, `bias` `[D]` or None: `act(bias + causal conv)`."""
    width, seqlen = weight.shape[1], x.shape[-1]
    xe = torch.nn.functional.pad(x, (width - 1, 0))
    pre = sum(weight[:, k, None] * xe[..., k : k + seqlen] for k in range(width))
    if bias is not None:
        pre = pre + bias[:, None]
    return _silu(pre) if silu else pre


def short_conv_fused(x, weight, bias, mask, silu: bool, residual: bool):
    """`x` `[B, T, D]`: `(x if residual) + act(bias + conv(x * mask))`; `mask` `[B, T]` or None."""
    masked = x if mask is None else x * mask[..., None]
    out = conv_channel_first(masked.transpose(1, 2), weight, bias, silu).transpose(1, 2)
    return out + x if residual else out


def decode_step(x, state, weight, bias, silu: bool, residual: bool):
    """Shift-mode decode of one token: `x` `[B, D]`, `state` `[B, D, S]` (oldest first).

    Returns `(out [B, D], new_state [B, D, S])`.
    """
    width = weight.shape[1]
    extended = torch.cat([state, x[..., None]], dim=-1)
    window = extended[..., extended.shape[-1] - width :]
    pre = (window * weight).sum(-1)
    if bias is not None:
        pre = pre + bias
    out = _silu(pre) if silu else pre
    if residual:
        out = out + x
    return out, extended[..., 1:]
